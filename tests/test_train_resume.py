"""`--resume latest` continues only what it can: same code fingerprint and output-shaping config (max_train_steps
aside)."""

from __future__ import annotations

import json

import pytest

from conftest import train_config
from stages import train as train_stage
from xpsr_core import fingerprint
from xpsr_core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_changed_code_refuses_or_starts_fresh_and_says_so(tiny_models, train_shards, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    first = train_stage.run(train_config(tiny_models, train_shards, out, max_train_steps=3))
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["fingerprint"]["code"] == fingerprint.stage_fingerprint("train")["code"]

    # nothing to do: the summary says so in words
    capsys.readouterr()
    again = train_stage.run(train_config(tiny_models, train_shards, out, max_train_steps=3, resume="latest"))
    assert again["steps_this_run"] == 0 and again["parameter_digest"] == first["parameter_digest"]
    said = capsys.readouterr().err
    assert "nothing to do" in said and "None" not in said

    real_versions = fingerprint.library_versions
    monkeypatch.setattr(fingerprint, "library_versions", lambda stage: {**real_versions(stage), "diffusers": "99.0"})
    with pytest.raises(UserError, match=r"diffusers .* -> 99\.0"):
        train_stage.run(train_config(tiny_models, train_shards, out, max_train_steps=6, resume="latest"))
    capsys.readouterr()
    fresh = train_stage.run(
        train_config(tiny_models, train_shards, out, max_train_steps=6, resume="latest", overwrite=True)
    )
    assert fresh["resumed_from"] == 0 and fresh["steps_this_run"] == 6
    said = capsys.readouterr()
    assert "--overwrite: removing the" in said.err and "starts from step 0" in said.out


def test_a_checkpoint_of_other_code_or_config_is_not_continued(tiny_models, train_shards, tmp_path, capsys):
    out = tmp_path / "run"
    train_stage.run(train_config(tiny_models, train_shards, out, max_train_steps=3))
    state_file = out / "checkpoint-3" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["fingerprint"]["sources"]["xpsr_core/train/loop.py"] = "0" * 16
    state["fingerprint"]["code"] = "0" * 16
    state_file.write_text(json.dumps(state))
    with pytest.raises(UserError, match="xpsr_core/train/loop.py"):
        train_stage.run(train_config(tiny_models, train_shards, out, max_train_steps=6, resume="latest"))
    # a checkpoint made with another learning rate, passed explicitly
    other = tmp_path / "other"
    train_stage.run(train_config(tiny_models, train_shards, other, max_train_steps=3, learning_rate=1e-3))
    with pytest.raises(UserError, match="learning_rate"):
        train_stage.run(train_config(tiny_models, train_shards, tmp_path / "third", max_train_steps=6,
                                    resume=str(other / "checkpoint-3")))
    capsys.readouterr()
    fresh = train_stage.run(
        train_config(tiny_models, train_shards, out, max_train_steps=6, resume="latest", overwrite=True)
    )
    assert fresh["resumed_from"] == 0 and fresh["steps_this_run"] == 6
    assert "training starts fresh from step 0" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_nothing_to_do_summary_has_no_none_figures():
    line = train_stage.train_summary({"steps": 100, "steps_this_run": 0, "resumed_from": 100, "first_loss": None,
                                      "final_loss": None, "samples_per_s": None, "final_export": "models/xpsr/final"})
    assert "nothing to do" in line and "None" not in line
