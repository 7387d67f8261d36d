"""Shard worker: one process per device, serving the model over gRPC (see proto/generate.proto)."""
