"""Generate Python code for every .proto file under proto/ (``python -m proto.generate``).

``--check`` regenerates into a temporary folder and exits 1 when the committed code differs.
The import paths come out as ``proto.distill.v1.x_pb2`` because protoc runs from the repo root.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in proto_files():
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(ROOT)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")


def generated_names(proto: Path) -> list[Path]:
    rel = proto.relative_to(ROOT).with_suffix("")
    return [rel.with_name(rel.name + suffix) for suffix in SUFFIXES]


def stale_files() -> list[str]:
    """Generated files that differ from what protoc makes of the .proto files now."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for proto in proto_files():
            for rel in generated_names(proto):
                fresh, committed = Path(tmp) / rel, ROOT / rel
                if fresh.exists() and (not committed.exists() or not filecmp.cmp(fresh, committed, False)):
                    stale.append(str(rel))
        return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    if parser.parse_args().check:
        stale = stale_files()
        if stale:
            sys.exit("stale generated code, run `python -m proto.generate`: " + ", ".join(stale))
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for proto in proto_files():
            for rel in generated_names(proto):
                if (Path(tmp) / rel).exists():
                    shutil.copyfile(Path(tmp) / rel, ROOT / rel)


if __name__ == "__main__":
    main()
