"""The shard service's wire types and gRPC stubs, generated from ``generate.proto``.

``from proto import pb, pb_grpc`` gives the messages and the service stubs.
"""

from . import build

if build.stale():
    # A source checkout that skipped `make proto`: generate the stubs next to the .proto file.
    build.generate()

from . import generate_pb2 as pb
from . import generate_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
