#!/usr/bin/env bash
# A/B of the gemv table in one lease (issue 15): workload (b) and (a) alternating with GEMV_TABLE as
# committed and emptied (cuBLAS everywhere), from two copies of this checkout. Results under $OUT/r.
set -u
OUT=${OUT:-/tmp/out}
here=$PWD
rm -rf /tmp/nogemv && cp -r "$here" /tmp/nogemv
python3 - <<'PY'
p = "/tmp/nogemv/kernels/gemv.py"
s = open(p).read()
i = s.index("GEMV_TABLE: dict[")
j = s.index("\n}\n", i) + 3
open(p, "w").write(s[:i] + "GEMV_TABLE: dict[tuple[str, int, int], dict[int, GemvConfig]] = {}\n" + s[j:])
PY
for run in b:1 b:2 a:1; do
  w=${run%%:*}; i=${run##*:}
  for side in nogemv gemv; do
    dir=$here; [ $side = nogemv ] && dir=/tmp/nogemv
    extra=""; [ $w = b ] && extra="--model llama-3.1-8b"
    (cd "$dir" && OUT=$OUT bash docs/benchmarks/h200-2026-12-02.sh none > /dev/null 2>&1
     PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 /tmp/site/bin/shoal bench throughput --workload $w $extra --hf-subset 0 \
       --result-file "$OUT/r/ab-$w-$side-$i.json" > "$OUT/r/ab-$w-$side-$i.log" 2>&1)
    echo "$w $side $i: $(grep -m1 'full (' "$OUT/r/ab-$w-$side-$i.log")"
  done
done
