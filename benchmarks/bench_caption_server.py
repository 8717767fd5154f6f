"""Captions per second: the transformers engine (batched generate()) against a vLLM server at several concurrencies.

Same model, images, instructions and greedy settings; the served side is xpsr's own client
(``xpsr_core.caption.served``), one request per prompt, ``concurrency`` in flight.

CPU (tiny zoo; starts a CPU vLLM from ``tools/vllm_cpu.sh build``):

    python benchmarks/bench_caption_server.py --vllm-venv ~/.cache/xpsr-vllm [--images 32 --tokens 32]

GPU (LLaVA-1.5-7B shapes, bf16): build the folder with `xpsr models sd15-shaped --out DIR`, then either let this
script start `python -m vllm.entrypoints.openai.api_server` from a vLLM install:

    python benchmarks/bench_caption_server.py --model DIR/captioner --device cuda --dtype bfloat16 \\
        --vllm-python /path/to/vllm-env/bin/python --concurrency 1,8,32,128 --images 256

or point it at a server already running (``--endpoint http://127.0.0.1:8000/v1``). ``gpu_case(...)`` is the same
run as a function, returning the results dict that is also printed as JSON (``--json FILE`` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xpsr_core.caption import CONTENT_INSTRUCTION, QUALITY_INSTRUCTION, GenerationSettings  # noqa: E402
from xpsr_core.caption.served import Endpoint, ServedCaptioner  # noqa: E402

INSTRUCTIONS = (CONTENT_INSTRUCTION, QUALITY_INSTRUCTION)


def bench_images(count: int, size: int):
    from benchmarks.bench_caption import lr_images

    return lr_images(count, size)


def transformers_rate(model: str, images, tokens: int, batch: int, device: str, dtype: str) -> dict:
    """Captions/s of the transformers engine, batched as the caption stage does (two prompts per image)."""
    from xpsr_core.caption import Captioner

    captioner = Captioner(model, dtype=dtype, device=device, settings=GenerationSettings(max_new_tokens=tokens))
    captioner.caption(images[:1], INSTRUCTIONS)  # warm-up
    start = time.perf_counter()
    texts = []
    for first in range(0, len(images), batch):
        texts += captioner.caption(images[first : first + batch], INSTRUCTIONS)
    seconds = time.perf_counter() - start
    del captioner
    return {"captions": 2 * len(images), "seconds": round(seconds, 3),
            "captions_per_s": round(2 * len(images) / seconds, 3), "texts": [t for pair in texts for t in pair]}


def server_rate(endpoint: str, model: str, images, tokens: int, concurrency: int) -> dict:
    """Captions/s through xpsr's client against a running server, ``concurrency`` requests in flight."""
    served = ServedCaptioner(Endpoint(endpoint, model, timeout=600, max_retries=3),
                             GenerationSettings(max_new_tokens=tokens), concurrency)
    served.caption(images[:1], INSTRUCTIONS)  # warm-up
    start = time.perf_counter()
    texts = [t for pair in served.caption(images, INSTRUCTIONS) for t in pair]
    seconds = time.perf_counter() - start
    failed = sum(not isinstance(t, str) for t in texts)
    return {"concurrency": concurrency, "captions": len(texts), "failed": failed, "seconds": round(seconds, 3),
            "captions_per_s": round(len(texts) / seconds, 3), "texts": texts}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(command: list[str], url: str, log: Path, timeout: float = 1200) -> subprocess.Popen:
    """Start a server process and wait until ``url``/models answers (its output goes to ``log``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/models", timeout=5):
                return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"the server did not come up; see {log}:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(2)


def run(model: str, images, tokens: int, batch: int, concurrencies: list[int], device: str, dtype: str,
        endpoint: str | None = None, server_command: list[str] | None = None, log: Path | None = None) -> dict:
    """The transformers baseline, then the server at each concurrency (started from ``server_command`` when
    ``endpoint`` is None, and stopped at the end). Ratios are server over transformers captions/s."""
    results = {"model": model, "images": len(images), "tokens": tokens, "batch": batch, "device": device,
               "dtype": dtype}
    baseline = transformers_rate(model, images, tokens, batch, device, dtype)
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # the server needs the GPU's memory next
    process = None
    if endpoint is None:
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}/v1"
        log = log or Path(tempfile.mkdtemp()) / "server.log"
        process = start_server([*server_command, "--port", str(port)], endpoint, log)
    try:
        served = [server_rate(endpoint, model, images, tokens, c) for c in concurrencies]
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    reference = baseline.pop("texts")
    for entry in served:
        texts = entry.pop("texts")
        entry["identical_captions"] = sum(a == b for a, b in zip(reference, texts))
        entry["ratio"] = round(entry["captions_per_s"] / baseline["captions_per_s"], 3)
    results.update(transformers=baseline, server=served)
    return results


def vllm_command(python: str, model: str, dtype: str, extra: list[str] | None = None) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", dtype,
            "--host", "127.0.0.1", *(extra or [])]


def gpu_case(model: str, vllm_python: str, images: int = 256, tokens: int = 64, batch: int = 16,
             concurrencies: tuple[int, ...] = (1, 8, 32, 128), endpoint: str | None = None) -> dict:
    """LLaVA-1.5-7B shapes in bf16 on one GPU: transformers batched against a vLLM server (``model``: the
    captioner folder of `xpsr models sd15-shaped`; ``vllm_python``: the interpreter of a vLLM install)."""
    return run(model, bench_images(images, 128), tokens, batch, list(concurrencies), "cuda", "bfloat16",
               endpoint=endpoint, server_command=vllm_command(vllm_python, model, "bfloat16",
                                                              ["--gpu-memory-utilization", "0.8"]))


def print_table(results: dict) -> None:
    base = results["transformers"]
    print(f"{'engine':<28}{'captions/s':>12}{'seconds':>10}{'ratio':>8}{'same captions':>15}")
    print(f"{'transformers batch ' + str(results['batch']):<28}{base['captions_per_s']:>12}{base['seconds']:>10}"
          f"{1.0:>8}{'-':>15}")
    for entry in results["server"]:
        same = f"{entry['identical_captions']}/{entry['captions']}"
        print(f"{'vLLM server, concurrency ' + str(entry['concurrency']):<28}{entry['captions_per_s']:>12}"
              f"{entry['seconds']:>10}{entry['ratio']:>8}{same:>15}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="captioner folder (default: the tiny zoo's, built in a temporary folder)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="LR image side")
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens")
    parser.add_argument("--batch", type=int, default=16, help="images per generate() of the transformers engine")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated requests in flight")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--endpoint", help="a running server's base URL (serving --model under its path)")
    parser.add_argument("--vllm-venv", help="start tools/vllm_cpu.sh's CPU server from this virtual environment")
    parser.add_argument("--vllm-python", help="start vLLM's OpenAI server with this interpreter (GPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from xpsr_core.zoo import write_zoo

        model = str(write_zoo(Path(tempfile.mkdtemp()) / "zoo").captioner)
    if args.endpoint:
        command = None
    elif args.vllm_venv or args.vllm_python:  # the CPU venv's interpreter starts the server as tools/vllm_cpu.sh does
        python = args.vllm_python or str(Path(args.vllm_venv).expanduser() / "bin" / "python")
        command = vllm_command(python, model, args.dtype)
    else:
        raise SystemExit("give --endpoint, --vllm-venv or --vllm-python")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    images = bench_images(args.images, args.size)
    results = run(model, images, args.tokens, args.batch, concurrencies, args.device, args.dtype,
                  endpoint=args.endpoint, server_command=command)
    results["command"] = " ".join(sys.argv)
    results["load_before"] = os.getloadavg()[0]
    print_table(results)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
