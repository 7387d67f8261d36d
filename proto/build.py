"""Generates the gRPC stubs (``generate_pb2.py``, ``generate_pb2_grpc.py``) from ``generate.proto``.

The stubs are build outputs, never committed: ``make proto`` and the package build run this, and
``proto/__init__.py`` runs it on first import when the stubs are missing or older than the .proto file.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "generate.proto"
STUBS = ("generate_pb2.py", "generate_pb2_grpc.py", "generate_pb2.pyi")


def stale(out_dir: Path = PROTO_DIR) -> bool:
    """True when a stub is missing or older than the .proto file."""
    source_mtime = PROTO_FILE.stat().st_mtime
    return any(
        not (out_dir / name).exists() or (out_dir / name).stat().st_mtime < source_mtime for name in STUBS
    )


def generate(out_dir: Path = PROTO_DIR) -> None:
    """Runs protoc (from grpcio-tools) and rewrites the stub's import to be package-relative."""
    from grpc_tools import protoc  # imported here: only builds need grpcio-tools

    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE}")
    grpc_stub = out_dir / "generate_pb2_grpc.py"
    text = grpc_stub.read_text()
    grpc_stub.write_text(text.replace("import generate_pb2 as", "from . import generate_pb2 as"))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR)
