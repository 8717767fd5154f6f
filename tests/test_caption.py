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
from xpsr_core.caption.manifests import CAPTIONER_COLUMNS, load_captioner, manifest_schema
from xpsr_core.errors import UserError
from xpsr_core.io.shards import read_shard


def make_config(tiny_models, **changes) -> caption_stage.CaptionConfig:
    values = dict(captioner=str(tiny_models.captioner), base_model=str(tiny_models.sd), max_new_tokens=8, batch_size=2)
    values.update(changes)
    return caption_stage.CaptionConfig(**values)


def manifests(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.suffix == ".parquet" or p.name.endswith("stats.json")
    }


def test_manifest_rows_schema_and_token_counts(tiny_models, pair_shards, tmp_path):
    from transformers import CLIPTokenizer

    out = tmp_path / "captions"
    report = caption_stage.run(make_config(tiny_models, input_dir=pair_shards, out=out))
    assert report["samples"] == 6 and report["failed"] == 0 and report["captions_per_s"] > 0
    keys = [s["__key__"] for p in sorted(pair_shards.glob("*.tar")) for s in read_shard(p)]
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert pq.read_schema(files[0]).equals(manifest_schema(), check_metadata=False)
    table = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    assert list(table["key"]) == keys
    assert (table["status"] == "ok").all()
    assert (table["content_instruction"] == CONTENT_INSTRUCTION).all() and (
        table["quality_instruction"] == QUALITY_INSTRUCTION
    ).all()
    assert table["captioner_revision"].str.startswith("local-").all()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.sd / "tokenizer")
    for kind in ("content", "quality"):
        assert table[f"{kind}_caption"].str.len().gt(0).all()
        for text, tokens, truncated in zip(
            table[f"{kind}_caption"], table[f"{kind}_clip_tokens"], table[f"{kind}_truncated"]
        ):
            assert tokens == len(tokenizer(text)["input_ids"])
            assert truncated == (tokens > 77)
    assert (table["dataset"] == "photos").all() and table["source"].str.endswith(".png").all()


def test_interrupted_run_resumes_to_identical_manifests(tiny_models, pair_shards, tmp_path, monkeypatch):
    caption_stage.run(make_config(tiny_models, input_dir=pair_shards, out=tmp_path / "reference"))
    real = caption_stage.caption_shard
    calls = {"n": 0}

    def crash_on_second(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(*args)

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
        "--input-dir", str(pair_shards), "--out", str(tmp_path / "ranked"), "--captioner", str(tiny_models.captioner),
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

    from xpsr_core.caption import GenerationSettings

    # the splitting does not depend on the captions' length: 12 tokens, not the default 128, keep it quick
    captioner = Captioner(tiny_models.captioner, settings=GenerationSettings(max_new_tokens=12))
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
    with pytest.raises(UserError, match="The captioner folder .*nowhere does not exist"):
        Captioner(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="Could not load a captioner from .*broken"):
        Captioner(broken)


def test_cli_reports_missing_model_cleanly(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(photo("coffee", (32, 32))).save(tmp_path / "imgs" / "a.png")
    result = CliRunner().invoke(
        app, ["caption", "imgs", "--out", "c.parquet", "--captioner", "no/such/folder", "--base-model", "nowhere"]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_llava_next_style_model_runs_through_the_auto_path(tiny_models, tmp_path):
    from tiny_next import write_tiny_llava_next

    model = write_tiny_llava_next(tmp_path / "next", tiny_models.sd / "tokenizer")
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo("chelsea", (60, 40))).save(folder / "cat.png")
    out = tmp_path / "captions.parquet"
    caption_stage.run(make_config(tiny_models, images=folder, out=out, captioner=str(model)))
    row = pd.read_parquet(out).iloc[0]
    assert row["status"] == "ok" and row["content_caption"] and row["captioner"] == str(model)
    assert type(Captioner(model).model).__name__ == "LlavaNextForConditionalGeneration"


def test_separate_quality_captioner_and_hr_captions(tiny_models, quality_captioner, pair_shards, hr_captions):
    """The authors' recipe: content captions from one model, LR and HR quality captions from another."""
    import io

    from xpsr_core.caption.captioner import model_revision

    files = sorted(hr_captions.glob("*.parquet"))
    schema = pq.read_schema(files[0])
    assert schema.equals(manifest_schema(separate_quality=True, hr=True), check_metadata=False)
    default_columns = set(manifest_schema().names)
    assert {"hr_quality_caption", "hr_quality_clip_tokens", "hr_quality_truncated", *CAPTIONER_COLUMNS} <= set(
        schema.names
    ) - default_columns
    table = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    assert len(table) == 6 and (table["status"] == "ok").all()
    # both models' ids and revisions on every row; captioner/captioner_revision stay the content model's
    assert (table["content_captioner"] == str(tiny_models.captioner)).all() and (
        table["captioner"] == str(tiny_models.captioner)
    ).all()
    assert (table["quality_captioner"] == str(quality_captioner)).all()
    assert (table["content_captioner_revision"] == model_revision(tiny_models.captioner)).all()
    assert (table["quality_captioner_revision"] == model_revision(quality_captioner)).all()
    assert (table["captioner_revision"] == table["content_captioner_revision"]).all()
    # each caption comes from the model it is attributed to: recompute every shard's batch (2 images) directly
    from xpsr_core.caption import GenerationSettings

    settings = GenerationSettings(max_new_tokens=6)
    content_model, quality_model = (
        Captioner(tiny_models.captioner, settings=settings),
        Captioner(quality_captioner, settings=settings),
    )
    expected, one_model = {}, {}
    for tar in sorted(pair_shards.glob("*.tar")):
        samples = list(read_shard(tar))
        lr = [Image.open(io.BytesIO(s["lr.png"])).convert("RGB") for s in samples]
        hr = [Image.open(io.BytesIO(s["hr.png"])).convert("RGB") for s in samples]
        content = content_model.caption_pairs([(image, CONTENT_INSTRUCTION) for image in lr])
        quality = quality_model.caption_pairs(
            [pair for a, b in zip(lr, hr) for pair in ((a, QUALITY_INSTRUCTION), (b, QUALITY_INSTRUCTION))]
        )
        by_content_model = content_model.caption_pairs([(image, QUALITY_INSTRUCTION) for image in lr])
        for i, sample in enumerate(samples):
            expected[sample["__key__"]] = (content[i], quality[2 * i], quality[2 * i + 1])
            one_model[sample["__key__"]] = by_content_model[i]
    got = {row.key: (row.content_caption, row.quality_caption, row.hr_quality_caption) for row in table.itertuples()}
    assert got == expected
    # the quality model really is another model: the content model writes other quality captions
    assert all(got[key][1] != one_model[key] for key in got)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_models.sd / "tokenizer")
    for text, tokens, truncated in zip(
        table["hr_quality_caption"], table["hr_quality_clip_tokens"], table["hr_quality_truncated"]
    ):
        assert text and tokens == len(tokenizer(text)["input_ids"]) and truncated == (tokens > 77)
    stats = __import__("json").loads((hr_captions / "00000.stats.json").read_text())
    assert set(stats["truncated"]) == {"content", "quality", "hr_quality"}


def test_trust_remote_code_reaches_only_the_quality_model(tiny_models, quality_captioner, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    calls = []
    for cls in (AutoProcessor, AutoModelForImageTextToText):
        real = cls.from_pretrained.__func__

        def recording(klass, model, *args, _real=real, **kwargs):
            calls.append((str(model), kwargs.get("trust_remote_code", False)))
            return _real(klass, model, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    load_captioner.cache_clear()
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo("rocket", (40, 40))).save(folder / "rocket.png")
    out = tmp_path / "captions.parquet"
    caption_stage.run(
        make_config(
            tiny_models, images=folder, out=out, quality_model=str(quality_captioner), quality_trust_remote_code=True
        )
    )
    load_captioner.cache_clear()
    assert sorted(set(calls)) == sorted({(str(tiny_models.captioner), False), (str(quality_captioner), True)})
    row = pd.read_parquet(out).iloc[0]
    assert row["quality_captioner"] == str(quality_captioner) and "hr_quality_caption" not in row.index


def test_caption_settings_carry_the_generation_settings():
    from pydantic import ValidationError

    from xpsr_core.caption import GenerationSettings
    from xpsr_core.config import resolve_config

    config = caption_stage.CaptionConfig(max_new_tokens=5, do_sample=True, temperature=0.5)
    generation = config.generation()
    assert generation == GenerationSettings(max_new_tokens=5, do_sample=True, temperature=0.5)
    assert hash(generation) == hash(GenerationSettings(max_new_tokens=5, do_sample=True, temperature=0.5))
    assert (config.content_instruction, config.quality_instruction) == (CONTENT_INSTRUCTION, QUALITY_INSTRUCTION)
    # the manifests' generation column
    assert GenerationSettings().to_json() == ('{"do_sample": false, "max_new_tokens": 128, "num_beams": 1, '
                                             '"repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0}')
    with pytest.raises(UserError, match=r"caption.*top_p: Input should be less than or equal to 1 \(got 2\)"):
        resolve_config(caption_stage.CaptionConfig, "caption", {"caption": {"top_p": 2}})
    with pytest.raises(ValidationError, match="num_beams"):
        GenerationSettings(num_beams=0)
