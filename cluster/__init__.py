"""Cluster: the command line, deployment spec, Ray controller, etcd registry and autoscaler."""
