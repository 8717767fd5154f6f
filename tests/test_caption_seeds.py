"""Sampled captions are seeded per key: a caption does not depend on its batch-mates when do_sample is on."""

from __future__ import annotations

import pandas as pd
import pytest

from stages import caption

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def captions(pair_shards, tiny_models, out, **changes) -> pd.DataFrame:
    values = dict(input_dir=pair_shards, out=out, captioner=str(tiny_models.captioner), base_model=str(tiny_models.sd),
                  max_new_tokens=6, do_sample=True, temperature=1.5)
    values.update(changes)
    caption.run(caption.CaptionConfig(**values))
    frame = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))], ignore_index=True)
    return frame.set_index("key")[["content_caption", "quality_caption"]]


def test_sampled_captions_do_not_depend_on_batch_mates(pair_shards, tiny_models, tmp_path):
    alone = captions(pair_shards, tiny_models, tmp_path / "one", batch_size=1)
    together = captions(pair_shards, tiny_models, tmp_path / "four", batch_size=4)
    pd.testing.assert_frame_equal(alone, together)
    # sampling is really on: another seed draws other captions
    other = captions(pair_shards, tiny_models, tmp_path / "seed1", batch_size=4, seed=1)
    assert not other.equals(together)
