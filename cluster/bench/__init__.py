"""Benchmarks behind ``shoal bench …``: each prints a table and writes JSON.

Each command is one submodule with ``add_arguments(parser)`` and ``run_from_args(args)``; among them
``serve`` (:mod:`shoal.cluster.bench.serve`), a load generator for any OpenAI-compatible server, with
its workloads in :mod:`shoal.cluster.bench.datasets`. Nothing is imported here, so
``import shoal.cluster.bench`` stays light (``serve`` needs neither torch nor matplotlib).
"""
