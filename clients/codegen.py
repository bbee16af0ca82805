"""Regenerates the Python stubs of ``protos/loraplex/v1/inference.proto`` into ``clients/v1``.

    python -m loraplex.clients.codegen            # rewrite the stubs
    python -m loraplex.clients.codegen --check    # exit 1 when the checked-in stubs are stale

protoc names the generated modules after the proto's path (``loraplex.v1``); the
stubs live in ``loraplex.clients.v1``, so the imports and module names are
rewritten. The proto's own path in the descriptor pool stays
``loraplex/v1/inference.proto`` (server reflection serves it under that name).
Needs ``grpcio-tools`` (a test/dev dependency), not needed at run time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

PROTO = "loraplex/v1/inference.proto"
OUTPUTS = ("inference_pb2.py", "inference_pb2_grpc.py", "inference_pb2.pyi")
_REWRITES = (
    ("from loraplex.v1 import inference_pb2", "from loraplex.clients.v1 import inference_pb2"),
    ("'loraplex.v1.inference_pb2'", "'loraplex.clients.v1.inference_pb2'"),
)


def repo_root() -> Path:
    """The checkout holding ``protos/`` (this file is ``<root>/clients/codegen.py``)."""
    return Path(__file__).resolve().parent.parent


def generate(proto_root: Path) -> dict[str, bytes]:
    """Runs protoc on the proto and returns ``{file name: rewritten contents}``."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(os.path.dirname(grpc_tools.__file__)) / "_proto"
    with tempfile.TemporaryDirectory() as out:
        args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}",
                f"--grpc_python_out={out}", f"--pyi_out={out}", str(proto_root / PROTO)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_root / PROTO}")
        gen_dir = Path(out) / "loraplex" / "v1"
        return {name: _rewrite((gen_dir / name).read_text()).encode() for name in OUTPUTS}


def _rewrite(text: str) -> str:
    for old, new in _REWRITES:
        text = text.replace(old, new)
    return text


def stale_files(target: Path, generated: dict[str, bytes]) -> list[str]:
    """Names of the files in ``target`` that differ from ``generated`` (or are missing)."""
    stale = []
    for name, content in generated.items():
        path = target / name
        if not path.is_file() or path.read_bytes() != content:
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplex.clients.codegen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in stubs are stale")
    parser.add_argument("--root", type=Path, default=repo_root(), help="repository root (default: %(default)s)")
    args = parser.parse_args(argv)
    generated = generate(args.root / "protos")
    target = args.root / "clients" / "v1"
    stale = stale_files(target, generated)
    if args.check:
        if stale:
            print(f"stale generated stubs in {target}: {', '.join(stale)}; "
                  "run `python -m loraplex.clients.codegen`", file=sys.stderr)
            return 1
        print("generated stubs are up to date")
        return 0
    for name in stale:
        (target / name).write_bytes(generated[name])
        print(f"wrote {target / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
