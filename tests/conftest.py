"""Shared fixtures and helpers: small real photographs, a corpus of bad image files, the tiny model zoo and the
shards built from them (once per session), and the helpers several test modules use (import them with
``from conftest import ...``; test modules never import each other)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the workers share the cores: one OpenMP thread each (and in the commands they start), or the spin-waiting
    # threads of one stall the others. Set before anything imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core this process may use, at most four (each holds torch and the tiny zoo)."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def pytest_collection_modifyitems(session, config, items) -> None:
    """Modules marked ``slow`` run first (in file order, then the rest in file order): with the tests spread over
    workers a module at a time, the long ones then overlap instead of one of them running alone at the end."""
    slow = {item.module.__name__ for item in items if item.module is not None and item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module is None or item.module.__name__ not in slow)


def photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A real scikit-image photograph (optionally resized), H x W x 3 uint8."""
    from stages.demo_data import load_sample

    pixels = load_sample(name)
    if size:
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))
    return pixels


def built_once(tmp_path_factory, name: str, build):
    """``build(folder)``'s result, built once for the whole test run into ``folder`` and shared read-only.

    pytest-xdist gives every worker process its own session, so a session fixture would build its data once per
    worker. Here the first worker to ask builds it, under a lock, in the temporary folder all workers of the run
    share; the others wait for it and reuse it. The result (paths, small records) is kept beside it as a pickle."""
    import fcntl
    import pickle
    import shutil

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above the per-worker ones
    shared = root / "built-once"
    shared.mkdir(exist_ok=True)
    folder, result_file = shared / name, shared / f"{name}.result.pickle"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the worker dies
        if result_file.exists():
            return pickle.loads(result_file.read_bytes())
        if folder.exists():  # left half-built by a worker that failed
            shutil.rmtree(folder)
        folder.mkdir()
        result = build(folder)
        result_file.write_bytes(pickle.dumps(result))
        return result


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Six small real photographs in a nested folder, as a user's dataset would be."""

    def build(root: Path) -> Path:
        (root / "sub").mkdir()
        for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]):
            target = root / ("sub" if i % 2 else "") / f"{name}.png"
            Image.fromarray(photo(name, (96 + 8 * i, 80 + 4 * i))).save(target)
        return root

    return built_once(tmp_path_factory, "photos", build)


def _png_with_claimed_size(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR claims width x height (a decompression-bomb header)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


# file name -> (expected status, expected size after orientation or None)
BAD_CORPUS_EXPECTED = {
    "zero_bytes.jpg": ("empty_file", None),
    "truncated.jpg": ("decode_error", None),
    "text_file.png": ("decode_error", None),
    "sixteen_bit.png": ("ok", (72, 64)),
    "cmyk.jpg": ("ok", (72, 64)),
    "palette_transparent.png": ("ok", (72, 64)),
    "grayscale.png": ("ok", (72, 64)),
    "rgba.png": ("ok", (72, 64)),
    "exif_rotated.jpg": ("ok", (64, 96)),  # stored 96x64 with orientation 6 -> shown 64x96
    "one_pixel.png": ("too_small", None),
    "bomb_header.png": ("too_large", None),
    "no_permission.jpg": ("unreadable", None),
}


@pytest.fixture
def bad_corpus(tmp_path, monkeypatch) -> Path:
    """Every kind of bad input the shard stage must record instead of crashing on."""
    root = tmp_path / "bad"
    root.mkdir()
    base = photo("coffee", (72, 64))
    (root / "zero_bytes.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(photo("astronaut", (200, 200))).save(jpeg, format="JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "text_file.png").write_text("this is not an image\n")
    gray8 = np.asarray(Image.fromarray(base).convert("L"))
    Image.fromarray(gray8.astype(np.uint16) * 257).save(root / "sixteen_bit.png")
    Image.fromarray(base).convert("CMYK").save(root / "cmyk.jpg", format="JPEG")
    palette = Image.fromarray(base).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.save(root / "palette_transparent.png", transparency=0)
    Image.fromarray(gray8).save(root / "grayscale.png")
    rgba = Image.fromarray(base).convert("RGBA")
    alpha = np.full((64, 72), 255, np.uint8)
    alpha[:, :36] = 0  # left half fully transparent -> white after compositing
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "rgba.png")
    rotated = Image.fromarray(photo("chelsea", (96, 64)))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(root / "exif_rotated.jpg", format="JPEG", exif=exif.tobytes())
    Image.new("RGB", (1, 1), (1, 2, 3)).save(root / "one_pixel.png")
    (root / "bomb_header.png").write_bytes(_png_with_claimed_size(100_000, 100_000))
    locked = root / "no_permission.jpg"
    Image.fromarray(base).save(locked, format="JPEG")
    locked.chmod(0)
    if os.geteuid() == 0:
        # root ignores file modes, so make the kernel's answer for this one file what a user would get
        real_read_bytes = Path.read_bytes

        def read_bytes(self: Path) -> bytes:
            if self.name == locked.name:
                raise PermissionError(13, "Permission denied", str(self))
            return real_read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    yield root
    locked.chmod(0o644)


def output_bytes(folder: Path) -> dict[str, bytes]:
    """Every deterministic output file of a shard folder (not the config record or the timing report)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(Path(folder).iterdir())
        if p.suffix in (".tar", ".parquet") or p.name.endswith("stats.json") or p.name == "sizes.json"
    }


def train_config(tiny_models, train_shards, out, **changes):
    """A short CPU training run on the tiny zoo: six steps of batch 2, a checkpoint every three."""
    from stages import train as train_stage

    values = dict(
        input_dir=train_shards, out=out, base_model=str(tiny_models.sd), batch_size=2, max_train_steps=6,
        checkpointing_steps=3, shuffle_buffer=4, tensorboard=False, metrics_file=None, device="cpu",
    )
    values.update(changes)
    return train_stage.TrainConfig(**values)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each training run builds its own Accelerator, and accelerate keeps one global state per process: reset it
    around every test once accelerate is loaded."""
    import sys

    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; with other processes on the 2 cores, OpenMP's
    spin-waiting threads otherwise stall for seconds per step. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def perturbed_xpsr():
    """``make(base, seed)``: XPSR parts on a loaded base with the zero-initialised projections
    perturbed, so SFA, c_l and the Conditional Attention all influence the output (as after training)."""
    import torch

    from xpsr_core.models.xpsr import XPSRModel

    def make(base, seed: int = 0):
        xpsr = XPSRModel.from_base(base, with_dfc=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in (xpsr.controlnet, xpsr.conditional_attention):
                for parameter in module.parameters():
                    if parameter.abs().max() == 0:
                        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        return xpsr.eval()

    return make


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny model zoo (SD-1.5 layout + llava-hf captioner), built once per test session."""
    from xpsr_core.zoo import write_zoo

    return built_once(tmp_path_factory, "zoo", lambda folder: write_zoo(folder / "tiny", "tiny", seed=0))


@pytest.fixture(scope="session")
def hr_shards(photo_dir, tmp_path_factory) -> Path:
    """HR shards of the six test photographs (one 96 px crop each), three shards of two. Read-only."""
    from stages import shard

    def build(hr: Path) -> Path:
        shard.run(
            shard.ShardConfig(
                inputs=[{"path": str(photo_dir), "dataset": "photos"}], out=hr, crop_size=96, images_per_shard=2
            )
        )
        return hr

    return built_once(tmp_path_factory, "hr", build)


@pytest.fixture(scope="session")
def pair_shards(hr_shards, tmp_path_factory) -> Path:
    """LR/HR pair shards of the six test photographs (96 px HR, 24 px LR), three shards of two."""
    from stages import degrade

    def build(pairs: Path) -> Path:
        degrade.run(degrade.DegradeConfig(input_dir=hr_shards, out=pairs, batch_size=2))
        return pairs

    return built_once(tmp_path_factory, "pairs", build)


def _captioned(tiny_models, pair_shards, out: Path, **changes) -> Path:
    """Caption manifests of the test pairs by the tiny captioner (six new tokens) in ``out``."""
    from stages import caption

    values = dict(captioner=str(tiny_models.captioner), base_model=str(tiny_models.sd), max_new_tokens=6, batch_size=4)
    caption.run(caption.CaptionConfig(input_dir=pair_shards, out=out, **{**values, **changes}))
    return out


def _embedded(tiny_models, pair_shards, captions: Path, out: Path) -> Path:
    """Training shards of the test pairs, embedded from ``captions`` in ``out``."""
    from stages import embed

    embed.run(
        embed.EmbedConfig(input_dir=pair_shards, captions_dir=captions, out=out, base_model=str(tiny_models.sd),
                          batch_size=4)
    )
    return out


@pytest.fixture(scope="session")
def pair_captions(tiny_models, pair_shards, tmp_path_factory) -> Path:
    """Caption manifests of the six test pairs (tiny captioner, six new tokens). Read-only."""
    return built_once(tmp_path_factory, "pair-captions", lambda out: _captioned(tiny_models, pair_shards, out))


@pytest.fixture(scope="session")
def train_shards(tiny_models, pair_shards, pair_captions, tmp_path_factory) -> Path:
    """Training shards (pre-encoded prompts and latents) of the six test pairs, embedded from ``pair_captions``."""
    return built_once(
        tmp_path_factory, "train-shards", lambda out: _embedded(tiny_models, pair_shards, pair_captions, out)
    )


@pytest.fixture(scope="session")
def quality_captioner(tiny_models, tmp_path_factory) -> Path:
    """A second tiny captioner (other weights, another folder) standing in for a separate quality model (Q-Instruct)."""
    from xpsr_core.zoo import get_preset, write_captioner

    return built_once(
        tmp_path_factory,
        "quality-captioner",
        lambda folder: write_captioner(folder / "captioner", get_preset("tiny"), tiny_models.sd / "tokenizer", seed=7),
    )


@pytest.fixture(scope="session")
def hr_captions(tiny_models, quality_captioner, pair_shards, tmp_path_factory) -> Path:
    """Caption manifests in the authors' recipe: a separate quality captioner, and the HR images captioned too."""
    return built_once(
        tmp_path_factory,
        "hr-captions",
        lambda out: _captioned(
            tiny_models, pair_shards, out, quality_model=str(quality_captioner), caption_hr=True, batch_size=2
        ),
    )


@pytest.fixture(scope="session")
def train_shards_hr(tiny_models, pair_shards, hr_captions, tmp_path_factory) -> Path:
    """Training shards of the six test pairs with the HR images' quality embeddings (hr_quality.npy)."""
    return built_once(
        tmp_path_factory, "train-shards-hr", lambda out: _embedded(tiny_models, pair_shards, hr_captions, out)
    )


# ---- the bad-input tables: the real CLI, its exit code, its one-line message, and the files it must not touch ----


def tree_digest(*roots: Path) -> dict[bytes, tuple[str, int]]:
    """Every file and folder under ``roots``: (sha256 of the content or "dir", permission bits), keyed by the exact
    path bytes, so a test can tell whether a command changed, removed or added anything there."""
    import hashlib

    digest: dict[bytes, tuple[str, int]] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for folder, dirs, files in os.walk(os.fsencode(root)):
            for name in dirs:
                path = os.path.join(folder, name)
                digest[path] = ("dir", os.lstat(path).st_mode & 0o7777)
            for name in files:
                path = os.path.join(folder, name)
                info = os.lstat(path)
                if os.path.islink(path):
                    digest[path] = ("link:" + os.fsdecode(os.readlink(path)), 0)
                    continue
                try:
                    with open(path, "rb") as handle:
                        content = hashlib.sha256(handle.read()).hexdigest()
                except OSError:
                    content = "unreadable"
                digest[path] = (content, info.st_mode & 0o7777)
    return digest


class CliResult:
    """What one run of the ``xpsr`` command printed and returned."""

    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("Error:")]


def cli_arguments(args) -> list[str]:
    """Command-line arguments as a process receives them: paths as text, bytes (names that are not UTF-8) decoded the
    way Python decodes ``sys.argv``."""
    return [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]


def run_xpsr(*args, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> CliResult:
    """Run the real ``xpsr`` command in a fresh process (output piped, as in a log), from ``cwd``."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "80", **(env or {})}
    environment.pop("XPSR_DEBUG", None)
    process = subprocess.run(
        [sys.executable, "-m", "stages.cli", *cli_arguments(args)],
        cwd=cwd, env=environment, capture_output=True, timeout=timeout,
    )
    decode = lambda raw: raw.decode("utf-8", errors="backslashreplace")  # noqa: E731
    return CliResult(process.returncode, decode(process.stdout), decode(process.stderr))


def xpsr_here(*args, cwd: Path | None = None, env: dict | None = None) -> CliResult:
    """Run the ``xpsr`` command in this test process (typer's ``CliRunner``), from ``cwd``, output captured as a
    pipe would take it.

    A new interpreter spends about 6 s of CPU importing torch, diffusers and transformers before a command starts:
    tests of what a command does or refuses run it here, on the modules this process has loaded. ``run_xpsr`` stays
    for what only a new process shows: output at import time, environment read at import (the hub's offline
    switch), the bytes of a file name printed to a real pipe, signals. An exception the command lets through comes
    back as the traceback a process would print, so ``assert_one_line_error`` still sees it."""
    import traceback

    from typer.testing import CliRunner

    from stages.cli import app

    environment = {"COLUMNS": "80", "XPSR_DEBUG": None, **(env or {})}
    before_cwd, before_environ = os.getcwd(), dict(os.environ)
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(app, cli_arguments(args), env=environment)
    finally:
        os.chdir(before_cwd)
        os.environ.clear()  # a command may set variables for the libraries it loads (quiet.py): not for later tests
        os.environ.update(before_environ)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return CliResult(result.exit_code, result.stdout, stderr)


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    """A user error: a non-zero exit, no traceback, exactly one ``Error:`` line holding every fragment."""
    assert result.code not in (0, None), result.output
    assert "Traceback" not in result.output, result.output
    lines = result.error_lines()
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, result.output)
