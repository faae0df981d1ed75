#!/usr/bin/env bash
# The GPU check of the fast engine (bench/README.md, docs/architecture.md): on a CUDA machine with a
# CUDA torch in the venv, (1) the test suite with the engine on the GPU in fp32, then (2) the
# decode matrix on the GPU in bf16 — hf runner vs the static runner compiled with CUDA graphs, in
# bf16 and with int8 / int4 weights, batch 1/8/32, FASB monitoring off and on — beside model.generate.
#
#   make install                                   # once; then put a CUDA torch in .venv (docs/deployment.md)
#   bench/gpu_check.sh                             # both parts; output also in bench/results/
#   GPU_CHECK_TESTS=0 bench/gpu_check.sh           # the bench table only
#
# Why fp32 for the tests: the equality tests compare greedy tokens across runners and with
# model.generate, which needs the same numbers on both sides; the settings reach the servers the
# tests start through FASB_* variables (server/config.py), and device "auto" is the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-bench/results}
TOKENS=${TOKENS:-128}
RUNS=${RUNS:-3}
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: install a CUDA torch into .venv first (docs/deployment.md)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
EOF

if [ "${GPU_CHECK_TESTS:-1}" = "1" ]; then
  echo "== test suite on cuda (fp32)"
  FASB_DEVICE=cuda FASB_DTYPE=float32 "$PY" -m pytest -q -p no:cacheprovider 2>&1 | tee "$RESULTS/gpu_tests.log"
fi

echo "== decode matrix on cuda (bf16): generate, hf, static+compile (CUDA graphs), +int8, +int4; batch 1/8/32"
"$PY" bench/bench_decode.py --matrix --device cuda --dtype bfloat16 --matrix-threads 8 \
  --matrix-batches 1 8 32 --tokens "$TOKENS" --runs "$RUNS" --json-out "$RESULTS/gpu_matrix.json" \
  | tee "$RESULTS/gpu_matrix.md"
