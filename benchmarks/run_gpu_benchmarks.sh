#!/usr/bin/env bash
# Every GPU figure of the project in one command (benchmarks/gpu_figures.py), within about 8 minutes on one H100.
#
# Prepare on a CPU machine with the full environment (basicsr and open_clip are needed there only), from the
# repository root; the bundle (a few MiB: the tiny zoo's tokenizer and captioner, 512 px pairs with captions, LR
# inputs) and the wheels travel with the tree:
#   python benchmarks/gpu_figures.py prepare --bundle gpu_bundle
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers webdataset braceexpand \
#       importlib_metadata pydantic pydantic_core annotated_types typing_inspection typing_extensions
# Run on the GPU machine (Python 3.12 with torch, transformers and accelerate; no network):
#   bash benchmarks/run_gpu_benchmarks.sh        # figures in $OUT (default /tmp/gpu-out): gpu.txt, figures.json
# The models (SD-1.5 and LLaVA-1.5-7B shapes, random weights) are built on the GPU; every case runs in a fresh
# process under its own timeout (benchmarks/gpu_figures.py: plan), the timeouts adding up to under 8 minutes.
# The same run at tiny shapes on any machine: SMOKE=1 (prepare with --smoke first).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
BUNDLE=${BUNDLE:-gpu_bundle}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
python3 -c "import torch, diffusers, transformers, accelerate
for module in (torch, diffusers, transformers, accelerate): print(module.__name__, module.__version__)" \
    | tee -a "$OUT/gpu.txt"
python3 benchmarks/gpu_figures.py run --bundle "$BUNDLE" --out "$OUT" ${SMOKE:+--smoke} 2>&1 \
    | grep -v Warning | tee "$OUT/figures.log"
