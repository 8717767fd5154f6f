"""Training streams survive a bad sample: logged with key and shard, counted, skipped; resume stays bit-exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import train_config
from stages import train as train_stage
from xpsr_core.errors import UserError
from xpsr_core.io.shards import TarShardWriter, read_shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def damaged_shards(train_shards, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the training shards whose shard 00000 has an undecodable LR image in its first sample
    and whose shard 00002 is cut off in the middle of its second sample."""
    out = tmp_path_factory.mktemp("damaged")
    for file in train_shards.iterdir():
        if file.is_file():
            shutil.copy(file, out / file.name)
    samples = list(read_shard(train_shards / "00000.tar"))
    bad_key = samples[0]["__key__"]
    samples[0]["lr.png"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
    with TarShardWriter(out / "00000.tar") as writer:
        for sample in samples:
            writer.write(sample["__key__"], {k: v for k, v in sample.items() if k != "__key__"})
    data = (train_shards / "00002.tar").read_bytes()
    (out / "00002.tar").write_bytes(data[: int(len(data) * 0.75)])
    return out, bad_key


def test_bad_samples_are_logged_counted_skipped_and_resume_is_exact(tiny_models, damaged_shards, tmp_path, capfd):
    shards, bad_key = damaged_shards
    straight = train_stage.run(train_config(tiny_models, shards, tmp_path / "straight"))
    said = capfd.readouterr().err
    assert f"sample {bad_key} in shard {shards / '00000.tar'}" in said
    assert "00002.tar" in said
    assert straight["steps_this_run"] == 6 and straight["bad_samples_skipped"] >= 2
    keys = (tmp_path / "straight/logs/keys.rank0.tsv").read_text()
    assert bad_key not in keys

    train_stage.run(train_config(tiny_models, shards, tmp_path / "resumed", max_train_steps=3))
    resumed = train_stage.run(train_config(tiny_models, shards, tmp_path / "resumed", resume="latest"))
    assert resumed["resumed_from"] == 3
    assert resumed["parameter_digest"] == straight["parameter_digest"]
    assert resumed["bad_samples_skipped"] == straight["bad_samples_skipped"]
    assert (tmp_path / "resumed/logs/keys.rank0.tsv").read_text() == keys


def test_too_many_bad_samples_stop_the_run_with_a_clear_message(tiny_models, damaged_shards, tmp_path):
    shards, _ = damaged_shards
    with pytest.raises(UserError, match="max_bad_samples=0"):
        train_stage.run(train_config(tiny_models, shards, tmp_path / "run", max_bad_samples=0))
