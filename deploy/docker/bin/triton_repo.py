"""Write a Triton model repository for the exported models of a models folder.

The same entries ``rarechange export --triton-repo`` writes (``export.triton.write_triton_repo``:
``OUT/NAME/config.pbtxt`` and ``OUT/NAME/1/model.onnx``, derived from the ONNX graph), from the
``model.onnx`` files already exported, without torch. Each model is verified first (metadata and
weights digest) and goes under its own metadata name, the name the gateway asks Triton for.

The Triton Deployment of deploy/k8s/overlays/triton runs this as an init container from the
rarechange image, so Triton serves exactly the models the gateway holds.

    python /opt/rarechange/bin/triton_repo.py --out /models [--models-dir DIR] [--kind KIND_GPU]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def default_models_dir() -> Path:
    env = os.environ.get("RARECHANGE_MODELS_DIR")
    if env:
        return Path(env)
    from serving.config import default_models_dir as bundled

    return bundled()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="The Triton model repository.")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="Folder of NAME/model.onnx [$RARECHANGE_MODELS_DIR, else the bundled models].",
    )
    parser.add_argument(
        "--model", action="append", default=None, help="Only this model (repeatable) [all]."
    )
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--kind", choices=["KIND_GPU", "KIND_CPU", "KIND_AUTO"], default="KIND_GPU")
    parser.add_argument(
        "--tensorrt-fp16", action="store_true", help="TensorRT FP16 accelerator (GPU instances)."
    )
    args = parser.parse_args(argv)

    from export.triton import write_triton_repo
    from serving.backends.onnxruntime import read_verified_model
    from serving.errors import RareChangeError

    models_dir = args.models_dir or default_models_dir()
    paths = sorted(models_dir.glob("*/model.onnx"))
    if not paths:
        print(f"no NAME/model.onnx in {models_dir}", file=sys.stderr)
        return 1
    wanted = set(args.model or ())
    written: set[str] = set()
    for path in paths:
        try:
            _, metadata = read_verified_model(path)
        except (RareChangeError, OSError, ValueError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 1
        if wanted and metadata.name not in wanted:
            continue
        try:
            config = write_triton_repo(
                path,
                args.out,
                name=metadata.name,
                max_batch_size=args.max_batch_size,
                max_queue_delay_us=args.max_queue_delay_us,
                instances=args.instances,
                kind=args.kind,
                tensorrt_fp16=args.tensorrt_fp16,
            )
        except (ValueError, OSError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            return 1
        written.add(metadata.name)
        print(f"wrote {config}")
    missing = sorted(wanted - written)
    if missing:
        print(f"no such model in {models_dir}: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
