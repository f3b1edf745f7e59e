"""Wait until a Triton server is ready with every model of a models folder; exit 1 on timeout.

The gateway of deploy/k8s/overlays/triton runs this as an init container: `rarechange serve`
with ``RARECHANGE_BACKEND=triton`` checks every model on Triton at start and exits when Triton is
not there yet, so waiting here saves a crash loop (and its growing back-off) while Triton loads.
It speaks the Open Inference Protocol (KServe v2 gRPC) that Triton and `rarechange serve` share.

    python /opt/rarechange/bin/wait_for_triton.py [--url HOST:PORT] [--timeout-s 900]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def default_url() -> str:
    from serving.config import ServerSettings

    return str(ServerSettings.model_fields["triton_url"].default)


def model_names(models_dir: Path) -> list[str]:
    """The metadata names of the models the gateway will serve (what it asks Triton for)."""
    from serving.backends.onnxruntime import read_verified_model

    return sorted(read_verified_model(p)[1].name for p in models_dir.glob("*/model.onnx"))


def not_ready(client: object, names: list[str]) -> list[str]:
    """What is not ready yet: 'server', or model names; [] when all are."""
    if not client.is_server_ready():  # type: ignore[attr-defined]
        return ["server"]
    return [n for n in names if not client.is_model_ready(n)]  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("RARECHANGE_TRITON_URL") or default_url(),
        help="Triton's gRPC address [$RARECHANGE_TRITON_URL, else the server's default].",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path(os.environ["RARECHANGE_MODELS_DIR"])
        if os.environ.get("RARECHANGE_MODELS_DIR")
        else None,
        help="Models that must be ready [$RARECHANGE_MODELS_DIR; none: the server only].",
    )
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--interval-s", type=float, default=2.0)
    args = parser.parse_args(argv)

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    names = model_names(args.models_dir) if args.models_dir else []
    give_up = time.monotonic() + args.timeout_s
    waiting: list[str] = ["server"]
    last = ""
    while True:
        try:
            with grpcclient.InferenceServerClient(args.url) as client:
                waiting = not_ready(client, names)
        except InferenceServerException as exc:
            waiting, last = ["server"], str(exc.message() or exc)
        if not waiting:
            print(f"Triton at {args.url} is ready with {len(names)} model(s)")
            return 0
        if time.monotonic() >= give_up:
            print(
                f"Triton at {args.url} not ready after {args.timeout_s:g} s: waiting for "
                f"{', '.join(waiting)} {last}".rstrip(),
                file=sys.stderr,
            )
            return 1
        time.sleep(max(0.0, min(args.interval_s, give_up - time.monotonic())))


if __name__ == "__main__":
    sys.exit(main())
