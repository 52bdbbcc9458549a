"""The worker's gRPC service definition (``worker.proto``), its generated stubs and the codec.

``worker_pb2`` / ``worker_pb2_grpc`` are generated (``python -m shoal.workers.rpc.generate``) and
committed; ``codec`` converts them to and from the dataclasses of ``shoal.workers.protocol``;
``servicer`` is the service itself over an ``AsyncEngine``. Nothing here imports torch: the router
uses the stubs and the codec too.
"""
