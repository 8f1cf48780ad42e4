"""Generates herald/v1/*_pb2.py(i) from the repository's proto/ directory.

    python tools/gen_proto.py          # rewrite the checked-in stubs
    python tools/gen_proto.py --check  # exit 1 when they differ from proto/

The stubs are checked in so that `pip install ./clients/python` needs no
protoc; tests/test_proto_stubs.py runs --check, so they cannot drift.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parents[2] / "proto"
OUT = HERE.parent / "src"
PROTOS = ["herald/v1/events.proto", "herald/v1/cache.proto"]
GENERATED = [f"herald/v1/{name}{ext}" for name in ("events_pb2", "cache_pb2") for ext in (".py", ".pyi")]


def generate(out: Path) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}", *PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTOS} in {PROTO_ROOT}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    check = parser.parse_args().check
    if not check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [g for g in GENERATED if not filecmp.cmp(Path(tmp) / g, OUT / g, shallow=False)]
    if stale:
        print(
            f"stubs differ from proto/: {stale}; run python clients/python/tools/gen_proto.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
