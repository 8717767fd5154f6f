"""Crash and bad-input drills: kill -9 and rerun, a full disk, and the bad corpus end to end."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from conftest import output_bytes, xpsr_here

XPSR = str(Path(sys.executable).parent / "xpsr")
STOP_BEFORE_MARKER = Path(__file__).with_name("stop_before_done_marker.py")


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([XPSR, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def kill_midway(args: list[str], cwd: Path, out: Path, total: int, seed: int) -> int:
    """Run the command and SIGKILL it once a random number (>= 1, < total) of shards is done, with the next shard's
    data written but not yet marked done. The child says when it got there (a signal file), so the kill lands
    at that point however fast or loaded the machine is."""
    done = random.Random(seed).randint(1, total - 1)
    signal_file, log = cwd / "stopped-before-marker", cwd / "killed.stderr"
    root = str(Path(__file__).resolve().parents[1])
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(STOP_BEFORE_MARKER), str(done + 1), str(signal_file), *args],
            cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))},
        )
    try:
        while not signal_file.exists():
            assert process.poll() is None, f"the command ended before the kill point: {log.read_text()[-2000:]}"
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    unmarked = Path(signal_file.read_text().strip())
    assert unmarked.parent == out and not unmarked.exists()
    return len(list(out.glob("*.stats.json")))


STAGES = {
    "shard": lambda d, out, m: [
        "shard",
        f"photos={d['photos']}",
        "--out",
        str(out),
        "--crop-size",
        "96",
        "--images-per-shard",
        "1",
        "-j",
        "1",
    ],
    "degrade": lambda d, out, m: ["degrade", "--input-dir", str(d["hr"]), "--out", str(out), "-j", "1",
                                  "--batch-size", "1"],
    "caption": lambda d, out, m: [
        "caption",
        "--input-dir",
        str(d["pairs"]),
        "--out",
        str(out),
        "--captioner",
        str(m.captioner),
        "--base-model",
        str(m.sd),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "1",
    ],
    "embed": lambda d, out, m: [
        "embed",
        "--input-dir",
        str(d["pairs"]),
        "--captions-dir",
        str(d["captions"]),
        "--out",
        str(out),
        "--base-model",
        str(m.sd),
        "--batch-size",
        "1",
    ],
}


@pytest.fixture(scope="module")
def one_per_shard(photo_dir, tiny_models, tmp_path_factory):
    """Inputs with one sample per shard, so a stage has six shards to be killed between."""
    root = tmp_path_factory.mktemp("drill-inputs")
    folders = {"photos": photo_dir}
    for stage, name in (("shard", "hr"), ("degrade", "pairs"), ("caption", "captions")):
        folders[name] = root / name
        result = xpsr_here(*STAGES[stage](folders, folders[name], tiny_models), cwd=root)
        assert result.code == 0, result.stderr[-2000:]
    return folders


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_then_rerun_gives_identical_outputs(stage, one_per_shard, tiny_models, tmp_path):
    reference = tmp_path / "reference"
    assert xpsr_here(*STAGES[stage](one_per_shard, reference, tiny_models), cwd=tmp_path).code == 0
    out = tmp_path / "killed"
    done_at_kill = kill_midway(
        STAGES[stage](one_per_shard, out, tiny_models), tmp_path, out, total=6, seed=zlib.crc32(stage.encode())
    )
    assert 1 <= done_at_kill < 6, f"the kill landed after {done_at_kill} of 6 shards"
    assert not (out / "sizes.json").exists()
    # the rerun reads only what the killed process left on disk, so it runs in this process
    result = xpsr_here(*STAGES[stage](one_per_shard, out, tiny_models), cwd=tmp_path)
    assert result.code == 0, result.stderr[-2000:]
    assert output_bytes(out) == output_bytes(reference)
    if stage == "embed":
        assert (out / "negative.npy").read_bytes() == (reference / "negative.npy").read_bytes()


def test_changed_params_refuse_to_mix_unless_overwrite(one_per_shard, tiny_models, tmp_path):
    out = tmp_path / "pairs"
    assert xpsr_here(*STAGES["degrade"](one_per_shard, out, tiny_models), cwd=tmp_path).code == 0
    refused = xpsr_here(*STAGES["degrade"](one_per_shard, out, tiny_models), "--seed", "7", cwd=tmp_path)
    assert refused.code != 0 and "different configuration" in refused.stderr and "Traceback" not in refused.stderr
    accepted = xpsr_here(*STAGES["degrade"](one_per_shard, out, tiny_models), "--seed", "7", "--overwrite",
                         cwd=tmp_path)
    assert accepted.code == 0, accepted.stderr[-2000:]


def small_filesystem(path: Path, size: str) -> bool:
    path.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_full_disk_gives_a_clear_message_and_no_complete_looking_file(
    one_per_shard, tiny_models, tmp_path, monkeypatch
):
    disk = tmp_path / "disk"
    mounted = small_filesystem(disk, "150k")
    try:
        args = STAGES["shard"](one_per_shard, disk / "hr", tiny_models)
        if mounted:  # a real full filesystem
            result = run_cli(args, tmp_path)
            text = result.stderr
        else:  # no permission to mount here: the same error raised by the writes themselves
            import tarfile

            from typer.testing import CliRunner

            from stages.cli import app

            real_addfile = tarfile.TarFile.addfile
            calls = {"n": 0}

            def filling_addfile(self, *a, **k):
                calls["n"] += 1
                if calls["n"] > 5:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_addfile(self, *a, **k)

            monkeypatch.setattr(tarfile.TarFile, "addfile", filling_addfile)
            result = CliRunner().invoke(app, args)
            text = result.output
        assert result.returncode != 0 if mounted else result.exit_code != 0
        assert "No space left on device" in text and "Traceback" not in text
        out = disk / "hr"
        for stats in out.glob("*.stats.json"):  # every shard that claims to be done is whole
            tar = out / stats.name.replace(".stats.json", ".tar")
            assert tar.is_file() and (out / stats.name.replace(".stats.json", ".parquet")).is_file()
        assert not list(out.glob("*.tmp-*")), "temporary files are removed on failure"
        assert not (out / "sizes.json").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])


def test_bad_corpus_through_the_pipeline_accounts_for_every_input(bad_corpus, photo_dir, tiny_models, tmp_path):
    from conftest import BAD_CORPUS_EXPECTED
    from stages import caption, degrade, embed, shard

    hr, pairs, captions, train = (tmp_path / n for n in ("hr", "pairs", "captions", "train"))
    inputs = [{"path": str(bad_corpus), "dataset": "bad"}, {"path": str(photo_dir), "dataset": "good"}]
    shard_report = shard.run(
        shard.ShardConfig(inputs=inputs, out=hr, crop_size=96, images_per_shard=4, min_size=8, max_failure_ratio=1.0)
    )
    bad = sum(status != "ok" for status, _ in BAD_CORPUS_EXPECTED.values())
    files = len(BAD_CORPUS_EXPECTED) + 6
    assert shard_report["inputs"] == files and shard_report["failed"] == bad
    assert sum(shard_report["status_counts"].values()) == files
    assert shard_report["samples"] == files - bad
    degrade_report = degrade.run(degrade.DegradeConfig(input_dir=hr, out=pairs))
    assert degrade_report["inputs"] == shard_report["samples"] and degrade_report["failed"] == 0
    caption_report = caption.run(
        caption.CaptionConfig(
            input_dir=pairs,
            out=captions,
            captioner=str(tiny_models.captioner),
            base_model=str(tiny_models.sd),
            max_new_tokens=6,
        )
    )
    assert caption_report["inputs"] == degrade_report["samples"]
    embed_report = embed.run(
        embed.EmbedConfig(input_dir=pairs, captions_dir=captions, out=train, base_model=str(tiny_models.sd))
    )
    assert embed_report["samples"] == caption_report["samples"]
