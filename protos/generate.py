"""Regenerate the committed gRPC code from helix.proto: `python -m protos.generate`.

The generated modules are committed (so a deployment needs no grpcio-tools) and
`tests/test_proto.py` regenerates into a temporary directory and fails when they differ. The
generated `helix_pb2_grpc.py` says `import helix_pb2`; it is rewritten to `from protos import
helix_pb2` so the package imports the same way everywhere.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = "helix.proto"
OUTPUTS = ("helix_pb2.py", "helix_pb2.pyi", "helix_pb2_grpc.py")


def generate(out_dir: str) -> list[str]:
    """Run protoc (grpcio-tools) on helix.proto into `out_dir`; return the paths written."""
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency only

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(HERE, PROTO),
        ]
    )
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} with status {rc}")
    grpc_path = os.path.join(out_dir, "helix_pb2_grpc.py")
    with open(grpc_path, encoding="utf-8") as fh:
        code = fh.read()
    code = code.replace("import helix_pb2 as helix__pb2", "from protos import helix_pb2 as helix__pb2")
    with open(grpc_path, "w", encoding="utf-8") as fh:
        fh.write(code)
    return [os.path.join(out_dir, name) for name in OUTPUTS]


def main() -> int:
    for path in generate(HERE):
        print(f"protos: wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
