"""Generates the Python code for proto/ into sidecar/gen (committed).

Run `make proto` (`python -m tests.protogen`) after editing a .proto;
tests/test_proto.py regenerates into a temporary directory and fails when the
committed code differs. A dev tool: it reads proto/, which is not shipped.
protoc names imports after the proto package (`tollway.v1`), so they are
rewritten to live under `sidecar.gen`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GEN_DIR = ROOT / "sidecar" / "gen"
PACKAGE = "sidecar.gen"


def generate(out_dir: Path) -> list[Path]:
    """Writes the generated modules under out_dir and returns their paths."""
    from grpc_tools import protoc  # dev dependency, needed only to regenerate

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix not in {".py", ".pyi"}:
            continue
        text = path.read_text()
        for proto in protos:
            pkg = ".".join(proto.relative_to(PROTO_DIR).parent.parts)
            text = text.replace(f"from {pkg} import", f"from {PACKAGE}.{pkg} import")
        path.write_text(text)
        written.append(path)
    for directory in {p.parent for p in written} | {out_dir}:
        while directory != out_dir.parent:
            (directory / "__init__.py").touch()
            directory = directory.parent
    return written


if __name__ == "__main__":
    for path in generate(GEN_DIR):
        print(path.relative_to(ROOT), file=sys.stderr)
