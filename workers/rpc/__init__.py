"""The worker's gRPC service definition (``worker.proto``), its generated stubs and the codec.

``worker_pb2`` / ``worker_pb2_grpc`` are generated (``python -m shoal.workers.rpc.generate``) and
committed; ``codec`` converts them to and from the dataclasses of ``shoal.workers.protocol``.
Nothing here imports torch: the router uses it too.
"""
