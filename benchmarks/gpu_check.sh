#!/usr/bin/env bash
# The GPU check, run on a machine with a CUDA GPU and a Python that has torch (no network
# needed). `make gpu-pack` prepares PACK on a machine with network: this project's wheel
# and the wheels of its dependencies that such an image may lack. This script installs
# them into a scratch folder, runs the CUDA tests through the gRPC service and the decode
# benchmark of an 8B-shaped model, and writes REPORT_DIR/gpu-check.md.
#
# Usage: benchmarks/gpu_check.sh PACK REPORT_DIR
set -uo pipefail
pack=${1:?usage: gpu_check.sh PACK REPORT_DIR}
report_dir=${2:?usage: gpu_check.sh PACK REPORT_DIR}
python=${PYTHON:-python3}
site=$(mktemp -d)
mkdir -p "$report_dir"
report="$report_dir/gpu-check.md"

$python -m pip install -q --no-index --no-deps --no-compile --target "$site" "$pack"/wheels/*.whl || exit 1
export PYTHONPATH="$site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export LLMGRPC_CACHE_DIR="$(mktemp -d)"

{
  echo "# GPU check"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $python -c 'import torch, transformers, grpc; print("torch", torch.__version__, "| transformers", transformers.__version__, "| grpcio", grpc.__version__)'
  echo '```'
  echo
  echo "## Decode speed (benchmarks/gpu_decode.py)"
  echo
} > "$report"

# The benchmark first: its numbers are what the check is for.
timeout 220 $python benchmarks/gpu_decode.py ${GPU_DECODE_ARGS:-} --json "$report_dir/gpu-decode.json" 2>"$report_dir/gpu-decode.log" \
  | sed -n '/^Device:/,$p' >> "$report" || echo "(the decode benchmark failed; see gpu-decode.log)" >> "$report"

{
  echo
  echo "## CUDA tests through the gRPC service (pytest -m cuda)"
  echo
  echo '```'
} >> "$report"
timeout 270 $python -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tail -25 >> "$report"
echo '```' >> "$report"
cat "$report"
