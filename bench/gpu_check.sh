#!/usr/bin/env bash
# The GPU check for issue 4, as one prepared script: build the TensorRT FP16 engine for the bundled
# model and measure patches/s of TensorRT FP16 vs ONNX Runtime CUDA fp32 vs CPU, in a few minutes.
# Run it on a machine with an NVIDIA GPU from the repository root:  bash bench/gpu_check.sh
# It uses .venv when present (carry it there), else python3; it needs onnxruntime-gpu installed
# there (pip install '.[gpu]' where a registry is reachable) and prints what is missing if not.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
"$PY" -c "import tensorrt as t; print('tensorrt', t.__version__)" 2>/dev/null || echo "tensorrt python package: not installed"
echo "== TensorRT FP16 vs CUDA fp32 vs CPU"
timeout 480 "$PY" bench/gpu_providers.py "$@"
echo "== export --tensorrt (engine cache beside a copy of the model)"
tmp=$(mktemp -d)
cp -r models/synthetic-thin "$tmp/"
"$PY" - "$tmp/synthetic-thin/model.onnx" <<'PY'
import sys
from pathlib import Path
from export.tensorrt import build_engine
b = build_engine(Path(sys.argv[1]))
print(f"engine cache {b.cache_dir}: batches {b.batch_sizes}, {b.seconds:.1f} s, max|TRT-CPU| {b.max_abs_diff_vs_cpu:.2g}")
PY
