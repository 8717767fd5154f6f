#!/usr/bin/env bash
# Runs the GPU benchmarks from the repository root; logs and figures go to $OUT (default /tmp/gpu-out):
#   gpu.txt         GPU, driver and library versions
#   train.json/.log training samples/s and peak memory, pre-encoded conditions against encoding on the fly,
#                   SD-1.5 shapes, bf16, 512 px, batch 4 and 8 (benchmarks/bench_train.py)
#   profile.log     torch.profiler over a batch-8 training step: kernel time against wall time, kernel launches,
#                   synchronising calls (benchmarks/profile_train_step.py)
#   model_step.log  one XPSR model step against diffusers' ControlNet + UNet, SD-1.5 shapes, bf16
#                   (benchmarks/bench_model_step.py)
# The GPU machine needs Python 3.12 with torch, transformers and accelerate, and two folders at the repository root,
# prepared on a machine with the full environment (basicsr and open_clip are needed there only):
#   gpu_bench/  512 px pairs, their captions and the CLIP tokenizer:
#     xpsr shard data/raw/demo --out gpu_bench/hr --crop-size 512 --crops-per-image 2 --images-per-shard 2
#     xpsr degrade --set input_dir=gpu_bench/hr --set out=gpu_bench/pairs
#     xpsr caption --set input_dir=gpu_bench/pairs --set out=gpu_bench/captions
#     cp -r models/tiny/sd15/tokenizer gpu_bench/tokenizer
#   .whl/       Python 3.12 wheels of the other dependencies, installed into /tmp/site without network:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers webdataset braceexpand \
#         importlib_metadata pydantic pydantic_core annotated_types typing_inspection typing_extensions
# Settings: TRAIN_STEPS (timed training steps, 10), TRAIN_TIMEOUT (360 s), PROFILE=0 skips the profile,
# PROFILE_TIMEOUT (180 s), MODEL_STEP=0 skips the model step, STEP_TIMEOUT (120 s).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers, accelerate
for module in (torch, diffusers, transformers, accelerate): print(module.__name__, module.__version__)" \
    | tee -a "$OUT/gpu.txt"
timeout "${TRAIN_TIMEOUT:-360}" python3 benchmarks/bench_train.py --build sd15 --pairs gpu_bench/pairs \
    --captions gpu_bench/captions --tokenizer gpu_bench/tokenizer --mixed-precision bf16 --batches 4 8 \
    --steps "${TRAIN_STEPS:-10}" --workers 4 --json "$OUT/train.json" 2>&1 | grep -v Warning | tee "$OUT/train.log"
if [ "${PROFILE:-1}" = 1 ]; then
    timeout "${PROFILE_TIMEOUT:-180}" python3 benchmarks/profile_train_step.py --build sd15 --pairs gpu_bench/pairs \
        --captions gpu_bench/captions --tokenizer gpu_bench/tokenizer --mixed-precision bf16 --batch 8 --workers 4 \
        2>&1 | grep -v Warning | tee "$OUT/profile.log"
fi
if [ "${MODEL_STEP:-1}" = 1 ]; then
    timeout "${STEP_TIMEOUT:-120}" python3 benchmarks/bench_model_step.py --device cuda --configs sd15 \
        --dtype bfloat16 --repeats 5 2>&1 | tee "$OUT/model_step.log"
fi
