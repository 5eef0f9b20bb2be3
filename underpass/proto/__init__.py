"""Generated protobuf modules of the shared core (do not edit the ``*_pb2`` files).

``zds_pb2``: ZDS, the node agent -> ztunnel pod handoff (PROTOCOLS.md section 5),
from ``zds.proto``; regenerate with ``python -m underpass.protogen``.
"""
