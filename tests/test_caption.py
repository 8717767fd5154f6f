"""The caption stage on the tiny captioner: manifests, resume, ranks, folder input, failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import photo
from stages import caption as caption_stage
from xpsr_core.caption import CONTENT_INSTRUCTION, QUALITY_INSTRUCTION, Captioner
from xpsr_core.errors import UserError
from xpsr_core.io.shards import read_shard


def make_config(tiny_models, **changes) -> caption_stage.CaptionConfig:
    values = dict(model=str(tiny_models.captioner), base_model=str(tiny_models.sd), max_new_tokens=8, batch_size=2)
    values.update(changes)
    return caption_stage.CaptionConfig(**values)


def manifests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".parquet" or p.name.endswith("stats.json")}


def test_manifest_rows_schema_and_token_counts(tiny_models, pair_shards, tmp_path):
    from transformers import CLIPTokenizer

    out = tmp_path / "captions"
    report = caption_stage.run(make_config(tiny_models, input_dir=pair_shards, out=out))
    assert report["samples"] == 6 and report["failed"] == 0 and report["captions_per_s"] > 0
    keys = [s["__key__"] for p in sorted(pair_shards.glob("*.tar")) for s in read_shard(p)]
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert pq.read_schema(files[0]).equals(caption_stage.manifest_schema(), check_metadata=False)
    table = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    assert list(table["key"]) == keys
    assert (table["status"] == "ok").all()
    assert (table["content_instruction"] == CONTENT_INSTRUCTION).all() and (table["quality_instruction"] == QUALITY_INSTRUCTION).all()
    assert table["captioner_revision"].str.startswith("local-").all()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.sd / "tokenizer")
    for kind in ("content", "quality"):
        assert table[f"{kind}_caption"].str.len().gt(0).all()
        for text, tokens, truncated in zip(table[f"{kind}_caption"], table[f"{kind}_clip_tokens"], table[f"{kind}_truncated"]):
            assert tokens == len(tokenizer(text)["input_ids"])
            assert truncated == (tokens > 77)
    assert (table["dataset"] == "photos").all() and table["source"].str.endswith(".png").all()


def test_interrupted_run_resumes_to_identical_manifests(tiny_models, pair_shards, tmp_path, monkeypatch):
    caption_stage.run(make_config(tiny_models, input_dir=pair_shards, out=tmp_path / "reference"))
    real = caption_stage.caption_shard
    calls = {"n": 0}

    def crash_on_second(config, out, shard):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(config, out, shard)

    monkeypatch.setattr(caption_stage, "caption_shard", crash_on_second)
    with pytest.raises(RuntimeError):
        caption_stage.run(make_config(tiny_models, input_dir=pair_shards, out=tmp_path / "resumed"))
    monkeypatch.setattr(caption_stage, "caption_shard", real)
    report = caption_stage.run(make_config(tiny_models, input_dir=pair_shards, out=tmp_path / "resumed"))
    assert report["shards_skipped"] == 1 and report["shards_processed"] == 2
    assert manifests(tmp_path / "resumed") == manifests(tmp_path / "reference")


def test_two_ranks_equal_one_process(tiny_models, pair_shards, tmp_path):
    caption_stage.run(make_config(tiny_models, input_dir=pair_shards, out=tmp_path / "single"))
    bin_dir = Path(sys.executable).parent
    command = [
        str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--no-python", str(bin_dir / "xpsr"), "caption",
        "--in", str(pair_shards), "--out", str(tmp_path / "ranked"), "--model", str(tiny_models.captioner),
        "--base-model", str(tiny_models.sd), "--max-new-tokens", "8", "--batch-size", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    rank_reports = [json.loads((tmp_path / "ranked" / f"report.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["shards"] for r in rank_reports] == [2, 1], "rank 0 takes shards 0 and 2, rank 1 shard 1"
    assert sum(r["shards_processed"] for r in rank_reports) == 3, "no shard is captioned twice"
    assert manifests(tmp_path / "ranked") == manifests(tmp_path / "single")


def test_folder_input_records_bad_images(tiny_models, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(photo(name, (48, 40))).save(folder / f"{name}.jpg")
    (folder / "broken.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "captions.parquet"
    report = caption_stage.run(make_config(tiny_models, images=folder, out=out, max_new_tokens=90))
    table = pd.read_parquet(out).set_index("source")
    assert len(table) == 5 and report["inputs"] == 5 and report["failed"] == 2
    assert table.loc["broken.png", "status"] == "decode_error" and table.loc["empty.jpg", "status"] == "empty_file"
    assert table.loc["broken.png", "error"] and pd.isna(table.loc["broken.png", "content_caption"])
    good = table[table["status"] == "ok"]
    assert len(good) == 3
    # 90 generated tokens exceed CLIP's 77: truncation is measured and flagged
    assert good["content_truncated"].any() and (good["content_clip_tokens"] > 77).any()
    assert report["truncated_share"]["content"] > 0


def test_empty_generation_is_a_status(tiny_models, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo("rocket", (40, 40))).save(folder / "rocket.png")
    monkeypatch.setattr(Captioner, "_generate", lambda self, items: ["" for _ in items])
    out = tmp_path / "captions.parquet"
    caption_stage.run(make_config(tiny_models, images=folder, out=out, max_failure_ratio=1.0))
    row = pd.read_parquet(out).iloc[0]
    assert row["status"] == "empty_generation" and "content and quality" in row["error"]


def test_out_of_memory_splits_the_batch(tiny_models, monkeypatch):
    import torch

    captioner = Captioner(tiny_models.captioner)
    images = [Image.fromarray(photo(name, (32, 32))) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    expected = captioner.caption(images, [CONTENT_INSTRUCTION, QUALITY_INSTRUCTION])
    real_generate = captioner.model.generate
    sizes = []

    def limited_generate(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(**kwargs)

    monkeypatch.setattr(captioner.model, "generate", limited_generate)
    assert captioner.caption(images, [CONTENT_INSTRUCTION, QUALITY_INSTRUCTION]) == expected
    assert sizes == [8, 4, 2, 2, 4, 2, 2], "halves are retried until a batch fits"


def test_missing_or_malformed_model_folder(tmp_path):
    with pytest.raises(UserError, match="Cannot load a captioner"):
        Captioner(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="Cannot load a captioner"):
        Captioner(broken)


def test_cli_reports_missing_model_cleanly(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(photo("coffee", (32, 32))).save(tmp_path / "imgs" / "a.png")
    result = CliRunner().invoke(app, ["caption", "imgs", "--out", "c.parquet", "--model", "no/such/folder", "--base-model", "nowhere"])
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_llava_next_style_model_runs_through_the_auto_path(tiny_models, tmp_path):
    from tiny_next import write_tiny_llava_next

    model = write_tiny_llava_next(tmp_path / "next", tiny_models.sd / "tokenizer")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo("chelsea", (60, 40))).save(folder / "cat.png")
    out = tmp_path / "captions.parquet"
    caption_stage.run(make_config(tiny_models, images=folder, out=out, model=str(model)))
    row = pd.read_parquet(out).iloc[0]
    assert row["status"] == "ok" and row["content_caption"] and row["captioner"] == str(model)
    assert type(Captioner(model).model).__name__ == "LlavaNextForConditionalGeneration"
