"""engine=openai against a local OpenAI-style server (stdlib http.server on 127.0.0.1) that injects faults:
down, another model, 429 with Retry-After, 500, timeouts, malformed answers, a server killed mid-run."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from stages import caption as caption_stage
from xpsr_core.caption import served
from xpsr_core.errors import FailureRatioExceeded, UserError
from xpsr_core.io.shards import read_shard

MODEL = "served-captioner"
SECRET = "sk-test-4f1e9b"  # the key's value: must appear in no written file


def pixels_digest(image: Image.Image) -> str:
    image = image.convert("RGB")
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()[:12]


def expected_caption(digest: str, instruction: str) -> str:
    return f"{'summary' if 'summary' in instruction else 'quality'} of {digest}"


class FakeServer:
    """An OpenAI-style server whose answers are a function of the image's pixels and the instruction.

    ``fault(body, digest, attempt)`` may return (status, headers, body bytes) or ("sleep", seconds) for one request;
    ``attempt`` counts the requests for that (image, instruction) so far."""

    def __init__(self, port: int = 0, model: str = MODEL):
        self.model, self.fault = model, None
        self.requests: list[dict] = []
        self.attempts: dict[tuple, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.delay = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except BrokenPipeError:  # the client gave up waiting (its timeout)
                    pass

            def do_GET(self):
                if self.path != "/v1/models":
                    return self.send(404, b"{}")
                data = [{"id": server.model, "object": "model", "root": "/models/" + server.model}]
                self.send(200, json.dumps({"object": "list", "data": data}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self.answer(body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def answer(self, body):
                image_part, text_part = body["messages"][0]["content"]
                url = image_part["image_url"]["url"]
                assert url.startswith("data:image/png;base64,")
                digest = pixels_digest(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
                instruction = text_part["text"]
                with server.lock:
                    key = (digest, instruction)
                    attempt = server.attempts.get(key, 0)
                    server.attempts[key] = attempt + 1
                    server.requests.append({"digest": digest, "instruction": instruction, "attempt": attempt,
                                            "auth": self.headers.get("Authorization"), "time": time.monotonic(),
                                            "body": {k: v for k, v in body.items() if k != "messages"}})
                time.sleep(server.delay)
                action = server.fault(body, digest, attempt) if server.fault else None
                if action and action[0] == "sleep":
                    time.sleep(action[1])
                elif action:
                    return self.send(*action)
                message = {"role": "assistant", "content": " " + expected_caption(digest, instruction)}
                answer = {"choices": [{"index": 0, "message": message}]}
                self.send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.stop()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(served, "BACKOFF_BASE_S", 0.01)
    monkeypatch.setenv("XPSR_TEST_CAPTION_KEY", SECRET)
    from xpsr_core.caption import manifests

    manifests.load_served_captioner.cache_clear()
    yield
    manifests.load_served_captioner.cache_clear()


def make_config(tiny_models, url, **changes) -> caption_stage.CaptionConfig:
    values = dict(captioner=str(tiny_models.captioner), base_model=str(tiny_models.sd), max_new_tokens=8,
                  engine="openai", endpoint=url, api_model=MODEL, api_key_env="XPSR_TEST_CAPTION_KEY",
                  concurrency=3, request_timeout=5, max_retries=2)
    values.update(changes)
    return caption_stage.CaptionConfig(**values)


def lr_digests(pair_shards: Path) -> dict[str, str]:
    return {s["__key__"]: pixels_digest(Image.open(io.BytesIO(s["lr.png"])))
            for p in sorted(pair_shards.glob("*.tar")) for s in read_shard(p)}


def table(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted(out.glob("*.parquet"))], ignore_index=True)


def written_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_served_manifest_matches_the_images_in_key_order(tiny_models, pair_shards, tmp_path, server):
    server.delay = 0.05  # requests overlap: the concurrency bound is visible
    out = tmp_path / "captions"
    report = caption_stage.run(make_config(tiny_models, server.url, input_dir=pair_shards, out=out))
    assert report["samples"] == 6 and report["failed"] == 0
    digests = lr_digests(pair_shards)
    rows = table(out)
    assert list(rows["key"]) == list(digests)
    assert (rows["status"] == "ok").all()
    for key, content, quality in zip(rows["key"], rows["content_caption"], rows["quality_caption"]):
        assert content == f"summary of {digests[key]}" and quality == f"quality of {digests[key]}"
    assert (rows["captioner"] == MODEL).all()  # the model id the server reports
    assert (rows["captioner_revision"] == f"openai:/models/{MODEL}").all()
    assert len(server.requests) == 12 and 1 < server.max_in_flight <= 3
    first = server.requests[0]["body"]
    assert first["temperature"] == 0.0 and first["max_tokens"] == 8 and first["add_special_tokens"] is True
    assert {r["auth"] for r in server.requests} == {f"Bearer {SECRET}"}
    assert SECRET.encode() not in written_bytes(out)
    # the engine, endpoint and concurrency are runtime settings: the same folder takes another engine's rerun
    same = caption_stage.run(make_config(tiny_models, server.url, input_dir=pair_shards, out=out, concurrency=1))
    assert same["shards_skipped"] == 3


def test_down_or_other_model_is_one_line_before_any_shard(tiny_models, pair_shards, tmp_path, server):
    down = FakeServer()
    down.stop()  # its port is closed now
    out = tmp_path / "captions"
    with pytest.raises(UserError, match="does not answer /models") as error:
        caption_stage.run(make_config(tiny_models, down.url, input_dir=pair_shards, out=out))
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=f"serves {MODEL}, not other-model") as error:
        caption_stage.run(make_config(tiny_models, server.url, api_model="other-model", input_dir=pair_shards,
                                      out=out))
    assert "\n" not in str(error.value) and not list(out.glob("*.parquet")) and not server.requests
    with pytest.raises(UserError, match="XPSR_UNSET_KEY"):
        caption_stage.run(make_config(tiny_models, server.url, api_key_env="XPSR_UNSET_KEY", input_dir=pair_shards,
                                      out=out))


def test_429_with_retry_after_and_500_are_retried(tiny_models, pair_shards, tmp_path, server):
    def fault(body, digest, attempt):
        if attempt == 0 and "summary" in body["messages"][0]["content"][1]["text"]:
            return (429, b'{"error": "busy"}', {"Retry-After": "1"})
        if attempt == 0:
            return (500, b"oops", {})
        return None

    server.fault = fault
    out = tmp_path / "captions"
    report = caption_stage.run(make_config(tiny_models, server.url, input_dir=pair_shards, out=out))
    assert report["failed"] == 0 and (table(out)["status"] == "ok").all()
    assert len(server.requests) == 24  # every prompt twice
    for digest, instruction in {(r["digest"], r["instruction"]) for r in server.requests}:
        tries = sorted(r["time"] for r in server.requests if (r["digest"], r["instruction"]) == (digest, instruction))
        if "summary" in instruction:
            assert tries[1] - tries[0] >= 0.95  # Retry-After: 1


def test_failed_rows_are_counted_then_retried_alone(tiny_models, pair_shards, tmp_path, server):
    digests = lr_digests(pair_shards)
    keys = list(digests)
    slow, broken = digests[keys[1]], digests[keys[4]]

    def fault(body, digest, attempt):
        if digest == slow:
            return ("sleep", 1.5)  # past request_timeout, on every try
        if digest == broken:
            return (200, b'{"choices": []}', {})  # malformed: not retried
        return None

    server.fault = fault
    out = tmp_path / "captions"
    config = make_config(tiny_models, server.url, input_dir=pair_shards, out=out, request_timeout=0.5,
                         max_retries=1, max_failure_ratio=0.2)
    with pytest.raises(FailureRatioExceeded, match="2 of 6 images failed .*caption_failed: 2"):
        caption_stage.run(config)
    report = json.loads((out / "report.json").read_text())
    assert report["failed"] == 2 and report["status_counts"]["caption_failed"] == 2
    rows = table(out).set_index("key")
    assert rows.loc[keys[1], "status"] == "caption_failed" and "timed out" in rows.loc[keys[1], "error"]
    assert "malformed answer" in rows.loc[keys[4], "error"] and pd.isna(rows.loc[keys[4], "content_caption"])
    assert (rows.drop(index=[keys[1], keys[4]])["status"] == "ok").all()
    kept = {name: (out / name).read_bytes() for name in ("00002.parquet", "00002.stats.json")}  # keys 4, 5 in 2
    slow_tries = sum(r["digest"] == slow for r in server.requests)
    assert slow_tries == 4 and sum(r["digest"] == broken for r in server.requests) == 2  # 2 retried, 1 not

    server.fault, server.requests = None, []
    report = caption_stage.run(config.model_copy(update={"max_failure_ratio": 0.5}))
    assert report["failed"] == 0 and report["shards_processed"] == 2 and report["shards_skipped"] == 1
    assert sorted({r["digest"] for r in server.requests}) == sorted({slow, broken}) and len(server.requests) == 4
    rows = table(out)
    assert list(rows["key"]) == keys and (rows["status"] == "ok").all()
    assert rows.set_index("key").loc[keys[1], "content_caption"] == f"summary of {slow}"
    assert (out / "00002.parquet").read_bytes() != kept["00002.parquet"]
    # the rows kept from the first run are the ones a clean run writes
    clean = tmp_path / "clean"
    caption_stage.run(make_config(tiny_models, server.url, input_dir=pair_shards, out=clean))
    for name in ("00000.parquet", "00001.parquet", "00002.parquet"):
        assert pd.read_parquet(out / name).equals(pd.read_parquet(clean / name))
    assert SECRET.encode() not in written_bytes(out)


def test_server_killed_mid_run_loses_and_duplicates_nothing(tiny_models, pair_shards, tmp_path, server):
    port = server.port
    answered = {"n": 0}

    def fault(body, digest, attempt):
        answered["n"] += 1
        if answered["n"] == 5:  # the server goes away while answering its fifth request
            threading.Thread(target=server.stop).start()
            return ("sleep", 0.3)
        return None

    server.fault = fault
    out = tmp_path / "captions"
    config = make_config(tiny_models, server.url, input_dir=pair_shards, out=out, concurrency=1, max_retries=1)
    with pytest.raises(FailureRatioExceeded):
        caption_stage.run(config)
    rows = table(out)
    assert list(rows["key"]) == list(lr_digests(pair_shards))  # every key once, in order
    assert set(rows["status"]) == {"ok", "caption_failed"} and (rows["status"] == "ok").sum() == 2
    assert rows.loc[rows["status"] == "caption_failed", "error"].str.contains("cannot reach|HTTP").all()

    again = FakeServer(port)  # restarted on the same address
    try:
        report = caption_stage.run(config)
        assert report["failed"] == 0
        rows = table(out)
        assert list(rows["key"]) == list(lr_digests(pair_shards)) and (rows["status"] == "ok").all()
        assert len(again.requests) == 8  # the four rows that failed, two prompts each
    finally:
        again.stop()


def test_sr_captions_from_the_server(tiny_models, server):
    from xpsr_core.infer.config import SRModelConfig
    from xpsr_core.infer.inputs import caption_images

    images = [Image.new("RGB", (24, 24), color) for color in ("red", "green", "blue")]
    broken = pixels_digest(images[2])
    server.fault = lambda body, digest, attempt: (503, b"down", {}) if digest == broken else None
    config = SRModelConfig(captioner=str(tiny_models.captioner), caption_engine="openai",
                           caption_endpoint=server.url, caption_api_model=MODEL, caption_max_retries=1,
                           caption_max_new_tokens=5)
    items = [{"name": f"{i}.png", "image": image} for i, image in enumerate(images)]
    caption_images(config, items)
    for item, image in zip(items[:2], images):
        assert item["content"] == f"summary of {pixels_digest(image)}"
        assert item["quality"] == f"quality of {pixels_digest(image)}"
    assert "HTTP 503" in items[2]["error"] and "content" not in items[2]
    assert server.requests[0]["body"]["max_tokens"] == 5
    config = config.model_copy(update={"caption_api_model": "nope"})
    with pytest.raises(UserError, match="not nope"):
        caption_images(config, [{"name": "x.png", "image": images[0]}])


def test_quality_captions_from_a_second_server(tiny_models, pair_shards, tmp_path, server):
    second = FakeServer(model="quality-captioner")
    try:
        out = tmp_path / "captions"
        config = make_config(tiny_models, server.url, input_dir=pair_shards, out=out, quality_model="q-instruct",
                             quality_endpoint=second.url, quality_api_model="quality-captioner")
        assert caption_stage.run(config)["failed"] == 0
        rows = table(out)
        assert (rows["quality_captioner"] == "quality-captioner").all()
        assert (rows["quality_captioner_revision"] == "openai:/models/quality-captioner").all()
        assert {r["instruction"] for r in server.requests} == {config.content_instruction}
        assert {r["instruction"] for r in second.requests} == {config.quality_instruction}
    finally:
        second.stop()
