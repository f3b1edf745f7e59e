"""Regenerate (or check) the committed Python stubs for proto/rarechange/v1/*.proto and the
vendored Open Inference Protocol (KServe v2) proto in proto/kserve/.

The stubs live flat in ``serving/api/`` so that serving imports them as ``serving.api``; protoc's
absolute package imports (``rarechange.v1``, ``kserve``) in the gRPC modules are rewritten to that
path. ``--check`` makes the stubs in a temporary folder and fails when they differ from the
committed ones (stale stubs).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "serving" / "api"
PROTO_DIRS = ("rarechange", "kserve")
PROTOS = sorted(
    p.relative_to(PROTO_ROOT) for d in PROTO_DIRS for p in (PROTO_ROOT / d).rglob("*.proto")
)
# Protos whose messages go into a private descriptor pool, not protobuf's default one: KServe's
# package ``inference`` is also defined by tritonclient's grpc_service.proto (a superset), and two
# files defining one symbol cannot share a pool, so the Triton backend (and tests driving the server
# with tritonclient) could not import tritonclient in a process that serves KServe.
PRIVATE_POOL = ("kserve",)
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = (
    "# rarechange: a private pool, so that tritonclient's `inference` package can load beside it\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)


def generate(out: Path) -> list[Path]:
    """Run protoc into ``out`` and return the files written, flat, imports rewritten."""
    from grpc_tools import protoc  # dev extra only

    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *map(str, PROTOS),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            text = src.read_text()
            for proto in PROTOS:
                module = str(proto.with_suffix("")).replace("/", ".") + "_pb2"
                package, _, name = module.rpartition(".")
                text = text.replace(
                    f"from {package} import {name}", f"from serving.api import {name}"
                )
            if src.parent.name in PRIVATE_POOL and src.name.endswith("_pb2.py"):
                if _DEFAULT_POOL not in text:
                    raise SystemExit(f"{src.name}: protoc's output changed; update PRIVATE_POOL")
                text = text.replace(_DEFAULT_POOL, _PRIVATE_POOL)
            dst = out / src.name
            dst.write_text(text)
            written.append(dst)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            p.name
            for p in generate(Path(tmp))
            if not (OUT / p.name).exists() or not filecmp.cmp(p, OUT / p.name, shallow=False)
        ]
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run `make proto`", file=sys.stderr)
        return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
