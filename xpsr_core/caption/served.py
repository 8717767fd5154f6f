"""Captions from a model served behind an OpenAI-compatible HTTP API (vLLM, SGLang, TGI...).

The prompts are the transformers engine's: the same instruction as a user message after the image, the
image as a PNG data URL of exactly the PIL image the transformers engine would get (PNG is lossless, so the
server's processor sees the same pixels), ``add_special_tokens`` so the server tokenizes the rendered chat
template as transformers' processor does (BOS included), greedy decoding as temperature 0 and ``max_tokens``
= ``max_new_tokens``. Requests run on ``concurrency`` threads; each thread encodes its own image, so at most
``concurrency`` encoded images exist at once. Connection errors, timeouts, 408, 429 (after its Retry-After)
and 5xx answers are retried with exponential backoff and jitter; a request that still fails yields a
:class:`CaptionFailure` in its place, which the manifest records as a ``caption_failed`` row.

Nothing here imports torch: a served captioner needs only the standard library and Pillow.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import UserError
from .settings import ENGINES, GenerationSettings, ServingSettings, prefixed_serving_fields  # noqa: F401

RETRY_STATUS = frozenset({408, 429})  # and every 5xx
BACKOFF_BASE_S = 0.5  # first retry waits up to this long; each further one twice as long
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 120.0  # a server asking for longer is waited on this long only
REVISION_PREFIX = "openai:"  # a served captioner's captioner_revision: the engine and the model the server names


@dataclass(frozen=True)
class CaptionFailure:
    """Why one prompt got no caption from the server, after its retries."""

    error: str

    def __bool__(self) -> bool:  # an empty result, like an empty caption
        return False


@dataclass(frozen=True)
class Endpoint:
    """One served model: the API's base URL, the model's name there, and the key's variable name."""

    url: str
    model: str
    api_key_env: Optional[str] = None
    timeout: float = 300.0
    max_retries: int = 5

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise UserError(f"The environment variable {self.api_key_env} (api_key_env) is not set.")
            headers["Authorization"] = f"Bearer {key}"
        return headers


def endpoints(settings, quality: bool = False) -> Endpoint:
    """The content captioner's endpoint of caption settings, or with ``quality`` the quality model's."""
    url = (settings.quality_endpoint or settings.endpoint) if quality else settings.endpoint
    if not url:
        raise UserError("engine=openai needs the server's base URL: set endpoint (e.g. http://127.0.0.1:8000/v1).")
    name = (settings.quality_api_model or settings.quality_model) if quality else (settings.api_model or
                                                                                    settings.captioner)
    return Endpoint(url.rstrip("/"), str(name), settings.api_key_env, settings.request_timeout,
                    settings.max_retries)


class _Retryable(Exception):
    """A failed attempt worth another: what happened, and how long the server asked us to wait (if it did)."""

    def __init__(self, message: str, wait: Optional[float] = None):
        super().__init__(message)
        self.wait = wait


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _request(endpoint: Endpoint, method: str, path: str, body: Optional[dict] = None) -> dict:
    """One HTTP exchange; the JSON answer, _Retryable for transient faults, RuntimeError for the rest."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(endpoint.url + path, data=data, method=method, headers=endpoint.headers())
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as error:
        detail = error.read()[:300].decode(errors="replace").strip()
        message = f"HTTP {error.code} from {endpoint.url}{path}: {detail or error.reason}"
        if error.code in RETRY_STATUS or error.code >= 500:
            raise _Retryable(message, _retry_after(error.headers.get("Retry-After"))) from None
        raise RuntimeError(message) from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise _Retryable(f"cannot reach {endpoint.url}{path}: {reason or type(error).__name__}") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise RuntimeError(f"the answer of {endpoint.url}{path} is not JSON: {raw[:120]!r}") from None


def _with_retries(endpoint: Endpoint, method: str, path: str, body: Optional[dict] = None) -> dict:
    attempt = 0
    while True:
        try:
            return _request(endpoint, method, path, body)
        except _Retryable as error:
            if attempt >= endpoint.max_retries:
                raise RuntimeError(f"{error} (after {attempt} retries)") from None
            backoff = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt))  # full jitter
            time.sleep(min(error.wait, RETRY_AFTER_MAX_S) if error.wait is not None else backoff)
            attempt += 1


def served_models(endpoint: Endpoint) -> list[dict]:
    """The server's models (``/v1/models``); a UserError naming the server when it cannot be asked."""
    try:
        answer = _request(endpoint, "GET", "/models")
        models = answer["data"]
        return [m for m in models if isinstance(m, dict) and "id" in m]
    except (_Retryable, RuntimeError, KeyError, TypeError) as error:
        raise UserError(f"The caption server at {endpoint.url} does not answer /models ({error}). Start it first "
                        f"(README: Captions from a serving engine) or fix endpoint.") from None


def check_endpoint(endpoint: Endpoint) -> dict:
    """The server's record of ``endpoint.model``; a one-line UserError when the server is down or serves others."""
    models = served_models(endpoint)
    for model in models:
        if model["id"] == endpoint.model:
            return model
    names = ", ".join(str(m["id"]) for m in models) or "none"
    raise UserError(f"The caption server at {endpoint.url} serves {names}, not {endpoint.model}: set api_model "
                    f"(or quality_api_model) to the served name, or serve that model.")


def png_data_url(image) -> str:
    """A PIL image as a PNG data URL (lossless: the server decodes the very pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class ServedCaptioner:
    """The interface of :class:`~xpsr_core.caption.captioner.Captioner` (``caption``, ``caption_pairs``,
    ``model_id``, ``revision``) against a served model; failed prompts come back as :class:`CaptionFailure`."""

    def __init__(self, endpoint: Endpoint, settings: GenerationSettings | None = None, concurrency: int = 32):
        self.endpoint = endpoint
        self.settings = settings or GenerationSettings()
        if self.settings.num_beams != 1:
            raise UserError("engine=openai decodes without beam search: set num_beams to 1.")
        self.concurrency = concurrency
        record = check_endpoint(endpoint)
        self.model_id = str(record["id"])
        # the engine and what the server says it serves (vLLM: the path or hub id it loaded as `root`)
        self.revision = REVISION_PREFIX + str(record.get("root") or record["id"])

    def request_body(self, image, instruction: str, seed: Optional[int] = None) -> dict:
        generation = self.settings
        content = [{"type": "image_url", "image_url": {"url": png_data_url(image)}},
                   {"type": "text", "text": instruction}]
        body = {"model": self.endpoint.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": generation.max_new_tokens, "n": 1,
                # the rendered template is tokenized with special tokens, as transformers' processor does
                "add_special_tokens": True, "skip_special_tokens": True}
        if generation.do_sample:
            body.update(temperature=generation.temperature, top_p=generation.top_p)
            if seed is not None:
                body["seed"] = int(seed)
        else:
            body["temperature"] = 0.0
        if generation.repetition_penalty != 1.0:
            body["repetition_penalty"] = generation.repetition_penalty
        return body

    def _one(self, image, instruction: str, seed: Optional[int]) -> "str | CaptionFailure":
        try:
            body = self.request_body(image, instruction, seed)
            answer = _with_retries(self.endpoint, "POST", "/chat/completions", body)
            text = answer["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (KeyError, IndexError, TypeError) as error:
            return CaptionFailure(f"malformed answer from {self.endpoint.url}/chat/completions: "
                                  f"{type(error).__name__}: {error}")
        except (RuntimeError, UserError, OSError) as error:
            return CaptionFailure(str(error))
        return text.strip()

    def caption_pairs(self, pairs: Sequence[tuple], seeds: Sequence[int] | None = None) -> list:
        """One caption (or CaptionFailure) per (image, instruction) pair, in the pairs' order."""
        if not pairs:
            return []
        seeds = list(seeds) if seeds is not None and self.settings.do_sample else [None] * len(pairs)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(pairs)),
                                thread_name_prefix="caption-request") as pool:
            futures = [pool.submit(self._one, image, text, seed) for (image, text), seed in zip(pairs, seeds)]
            return [future.result() for future in futures]

    def caption(self, images: Sequence, instructions: Sequence[str]) -> list[list]:
        """Captions[i][j] for image i and instruction j."""
        texts = self.caption_pairs([(image, text) for image in images for text in instructions])
        width = len(instructions)
        return [texts[i * width : (i + 1) * width] for i in range(len(images))]
