"""Regenerate the committed gRPC stubs from ``worker.proto``: ``python -m shoal.workers.rpc.generate``.

protoc runs on a copy of the proto laid out as ``shoal/workers/rpc/worker.proto``, so the descriptor
is registered under that unique name (a bare ``worker.proto`` could collide with another library's in
protobuf's global pool) and the ``_grpc`` stub imports its messages as a package import
(``from shoal.workers.rpc import worker_pb2``), never the top-level ``import worker_pb2`` protoc
emits for a flat layout. :func:`generate` rewrites any flat import it still finds, so the stubs load
whatever the layout. A test regenerates into a temporary folder and compares bytes with the committed
files.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "worker.proto"
PACKAGE = "shoal.workers.rpc"
OUTPUTS = ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py")

_FLAT_IMPORT = re.compile(r"^import worker_pb2 as (\w+)$", re.MULTILINE)
_PACKAGE_IMPORT = f"from {PACKAGE} import worker_pb2 as "


def _fix_grpc_import(source: str) -> str:
    source = _FLAT_IMPORT.sub(lambda m: _PACKAGE_IMPORT + m.group(1), source)
    if _PACKAGE_IMPORT not in source:
        raise RuntimeError(f"worker_pb2_grpc.py does not import its messages as {PACKAGE}.worker_pb2")
    return source


def generate(out_dir: Path, proto: Path = PROTO) -> list[Path]:
    """Write ``OUTPUTS`` into ``out_dir`` from ``proto``; returns their paths."""
    from grpc_tools import protoc  # a dev dependency: only regeneration needs it

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "src", *PACKAGE.split("."))
        src.mkdir(parents=True)
        shutil.copyfile(proto, src / "worker.proto")
        gen = Path(tmp, "gen")
        gen.mkdir()
        rel = "/".join(PACKAGE.split(".")) + "/worker.proto"
        args = ["grpc_tools.protoc", f"-I{Path(tmp, 'src')}", f"--python_out={gen}", f"--pyi_out={gen}",
                f"--grpc_python_out={gen}", rel]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        written = []
        for name in OUTPUTS:
            text = Path(gen, *PACKAGE.split("."), name).read_text()
            if name == "worker_pb2_grpc.py":
                text = _fix_grpc_import(text)
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shoal.workers.rpc.generate", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE, help="output folder (default: this package)")
    args = p.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
