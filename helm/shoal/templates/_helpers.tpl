{{/* Names, labels and the pieces several templates share. */}}

{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shoal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "shoal.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "shoal.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shoal.labels" -}}
{{ include "shoal.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: shoal
{{- end -}}

{{- define "shoal.deploymentName" -}}
{{- default (include "shoal.fullname" .) .Values.deployment.name -}}
{{- end -}}

{{- define "shoal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "shoal.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "shoal.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "shoal.etcdHeadless" -}}
{{- printf "%s-etcd-headless" (include "shoal.fullname" .) -}}
{{- end -}}

{{/* host:port[,host:port] every shoal process connects to. */}}
{{- define "shoal.etcdEndpoints" -}}
{{- if eq .Values.etcd.mode "external" -}}
{{- $tls := include "shoal.etcdTls" . -}}
{{- range .Values.etcd.external.endpoints -}}
{{- if and $tls (not (hasPrefix "https://" .)) -}}
{{- fail (printf "etcd.external.tls.secretName is set, so every etcd.external.endpoints entry must be https://host:port; got %q" .) -}}
{{- end -}}
{{- end -}}
{{- required "etcd.external.endpoints must name at least one host:port when etcd.mode is external" (join "," .Values.etcd.external.endpoints) -}}
{{- else -}}
{{- printf "%s-etcd:2379" (include "shoal.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "shoal.rayHeadService" -}}
{{- printf "%s-head-svc" (include "shoal.fullname" .) -}}
{{- end -}}

{{/* The DeploymentSpec (cluster/spec.py) as YAML: the launcher's -f file. Null engine values are left out. */}}
{{- define "shoal.spec" -}}
{{- $d := .Values.deployment -}}
{{- $pools := dict -}}
{{- range $role, $p := $d.pools -}}
{{- $engine := dict -}}
{{- range $k, $v := merge (deepCopy (default dict $p.engine)) (default dict $d.engine) -}}
{{- if not (kindIs "invalid" $v) -}}{{- $_ := set $engine $k $v -}}{{- end -}}
{{- end -}}
{{- $pool := dict "replicas" $p.replicas "tensor_parallel_size" $p.tensor_parallel_size "engine" $engine -}}
{{- $_ := set $pool "resources_per_rank" (include "shoal.rankResources" (dict "role" $role "pool" $p) | fromYaml) -}}
{{- if $p.kv_transfer -}}{{- $_ := set $pool "kv_transfer" $p.kv_transfer -}}{{- end -}}
{{- $_ := set $pools $role $pool -}}
{{- end -}}
{{- $etcd := dict "endpoints" (splitList "," (include "shoal.etcdEndpoints" .)) "prefix" $d.etcd.prefix -}}
{{- $router := dict "replicas" 1 "port" (int .Values.router.port) "policy" $d.router.policy "policy_options" (default dict $d.router.policy_options) "disagg_min_prefill_tokens" $d.router.disagg_min_prefill_tokens -}}
{{- if $d.router.tool_call_parser -}}{{- $_ := set $router "tool_call_parser" $d.router.tool_call_parser -}}{{- end -}}
{{- if $d.router.chat_template -}}{{- $_ := set $router "chat_template" $d.router.chat_template -}}{{- end -}}
{{- $spec := dict "name" (include "shoal.deploymentName" .) "model" .Values.model.name "pools" $pools "router" $router "etcd" $etcd -}}
{{- if $d.autoscaling -}}{{- $_ := set $spec "autoscaling" $d.autoscaling -}}{{- end -}}
{{- toYaml $spec -}}
{{- end -}}

{{/* A pool's resources_per_rank as the spec holds it: the values', plus the custom resource
     shoal_pool_<role> that only the pool's own worker group offers, so Ray places the pool's replicas
     on its own pods (and KubeRay's autoscaler grows the right group). Argument: dict role, pool. */}}
{{- define "shoal.rankResources" -}}
{{- $rank := deepCopy (default dict .pool.resources_per_rank) -}}
{{- $custom := deepCopy (default dict $rank.custom) -}}
{{- $_ := set $custom (printf "shoal_pool_%s" .role) 1 -}}
{{- $_ := set $rank "custom" $custom -}}
{{- toYaml $rank -}}
{{- end -}}

{{/* The model volume (pvc / hostPath), or nothing (builtin, image). */}}
{{- define "shoal.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required when model.source is hostPath" .Values.model.hostPath.path }}
    type: Directory
{{- end }}
{{- end -}}

{{- define "shoal.modelMount" -}}
{{- if has .Values.model.source (list "pvc" "hostPath") }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Placement of a pod: nodeSelector, tolerations, affinity, priorityClassName of the given values. */}}
{{- define "shoal.placement" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{- define "shoal.podCommon" -}}
serviceAccountName: {{ include "shoal.serviceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* "true" when an external etcd's TLS Secret is given (and etcd.mode is external), else "". */}}
{{- define "shoal.etcdTls" -}}
{{- if and (eq .Values.etcd.mode "external") .Values.etcd.external.tls.secretName -}}true{{- end -}}
{{- end -}}

{{/* Environment of every shoal process: no telemetry, no hub downloads, a writable HOME; the etcd
     TLS files (cluster/etcd_tls.py) when an external etcd's TLS Secret is given. */}}
{{- define "shoal.env" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: HF_HUB_OFFLINE
  value: "1"
- name: HOME
  value: /tmp
{{- if include "shoal.etcdTls" . }}
{{- $tls := .Values.etcd.external.tls }}
- name: SHOAL_ETCD_CACERT
  value: /var/run/shoal/etcd-tls/{{ required "etcd.external.tls.caKey is required with etcd.external.tls.secretName" $tls.caKey }}
{{- if $tls.certKey }}
- name: SHOAL_ETCD_CERT
  value: /var/run/shoal/etcd-tls/{{ $tls.certKey }}
- name: SHOAL_ETCD_KEY
  value: /var/run/shoal/etcd-tls/{{ required "etcd.external.tls.keyKey is required with etcd.external.tls.certKey" $tls.keyKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The etcd TLS Secret as a volume, and its mount: in every pod that runs a shoal process. */}}
{{- define "shoal.etcdTlsVolume" -}}
{{- if include "shoal.etcdTls" . }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcd.external.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "shoal.etcdTlsMount" -}}
{{- if include "shoal.etcdTls" . }}
- {name: etcd-tls, mountPath: /var/run/shoal/etcd-tls, readOnly: true}
{{- end }}
{{- end -}}
