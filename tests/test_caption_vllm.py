"""engine=openai against a real vLLM server of the tiny captioner, on this CPU.

Runs when a vLLM virtual environment built by ``tools/vllm_cpu.sh build`` exists (``XPSR_VLLM_VENV``, default
``~/.cache/xpsr-vllm``); the test starts the server itself on the test run's tiny captioner. It shows the served
prompts identical to the transformers engine's (token ids, image tokens included), the first generated token's
log-probabilities within 1e-4 of transformers' for every prompt, and prints the share of identical greedy captions.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from xpsr_core.caption import CONTENT_INSTRUCTION, QUALITY_INSTRUCTION, Captioner, GenerationSettings
from xpsr_core.caption.served import Endpoint, ServedCaptioner, _request
from xpsr_core.io.shards import read_shard

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("XPSR_VLLM_VENV", Path.home() / ".cache" / "xpsr-vllm")).expanduser()
START_TIMEOUT_S = float(os.environ.get("XPSR_VLLM_START_TIMEOUT", "600"))
LOGPROB_TOLERANCE = 1e-4
TOP = 20  # vLLM's default most log-probabilities per token

pytestmark = pytest.mark.skipif(
    not (VENV / "bin" / "python").is_file(),
    reason=f"no vLLM virtual environment at {VENV} (build one: tools/vllm_cpu.sh build; or set XPSR_VLLM_VENV)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_models, tmp_path_factory):
    """A vLLM server of the tiny captioner on 127.0.0.1; its log is kept beside the test's files."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("PYTHONPATH", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(REPO / "tools" / "vllm_cpu.sh"), "serve", str(tiny_models.captioner),
                                    str(port), str(VENV)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/models", timeout=5) as answer:
                    json.loads(answer.read())
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    pytest.fail(f"the vLLM server did not come up (log {log_path}):\n{tail}")
                time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def lr_images(pair_shards: Path) -> list[Image.Image]:
    return [Image.open(io.BytesIO(s["lr.png"])).convert("RGB")
            for p in sorted(pair_shards.glob("*.tar")) for s in read_shard(p)]


def test_vllm_prompts_logprobs_and_captions_match_transformers(tiny_models, pair_shards, vllm_server):
    import torch

    settings = GenerationSettings(max_new_tokens=16)
    local = Captioner(tiny_models.captioner, settings=settings)
    endpoint = Endpoint(vllm_server, str(tiny_models.captioner), timeout=120, max_retries=2)
    remote = ServedCaptioner(endpoint, settings, concurrency=4)
    assert remote.model_id == str(tiny_models.captioner)
    images = lr_images(pair_shards)
    pairs = [(image, text) for image in images for text in (CONTENT_INSTRUCTION, QUALITY_INSTRUCTION)]
    worst = 0.0
    for image, instruction in pairs:
        body = {**remote.request_body(image, instruction), "max_tokens": 1, "logprobs": True, "top_logprobs": TOP,
                "return_token_ids": True, "return_tokens_as_token_ids": True}
        answer = _request(endpoint, "POST", "/chat/completions", body)
        inputs = local.processor(images=[image], text=[local.prompt(instruction)], return_tensors="pt")
        assert answer["prompt_token_ids"] == inputs["input_ids"][0].tolist()  # image tokens and BOS included
        with torch.inference_mode():
            logits = local.model(**inputs).logits[0, -1].float()
        expected = torch.log_softmax(logits, dim=-1)
        served = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert len(served) == TOP
        for entry in served:
            token = int(entry["token"].split(":", 1)[1])
            difference = abs(entry["logprob"] - float(expected[token]))
            if not math.isinf(entry["logprob"]):
                worst = max(worst, difference)
        served_top = [int(e["token"].split(":", 1)[1]) for e in served]
        # the same tokens lead (ties aside: logits of a random model are close together)
        assert float(expected[served_top[0]]) >= float(expected.max()) - LOGPROB_TOLERANCE
    assert worst <= LOGPROB_TOLERANCE, f"first-token log-probabilities differ by up to {worst:.2e}"
    local_texts = local.caption_pairs(pairs)
    remote_texts = remote.caption_pairs(pairs)
    same = sum(a == b for a, b in zip(local_texts, remote_texts))
    print(f"\nfirst-token log-probabilities: largest difference {worst:.2e} over {len(pairs)} prompts x {TOP} "
          f"tokens; identical greedy captions: {same}/{len(pairs)}")
    assert all(isinstance(text, str) for text in remote_texts)
