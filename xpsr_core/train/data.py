"""Streaming training shards to the training loop, deterministically and resumably.

Shards are split by rank (``shards[rank::world]``) and then by dataloader worker, so no two
processes ever read the same shard. Within its partition each worker either resamples shards
with replacement (``resampled``, open_clip style, an endless stream) or walks seeded
permutations epoch after epoch. Samples pass through a seeded shuffle buffer, then the worker
batches and decodes them. Every random choice is seeded by (seed, rank, worker), so the stream of
batches is a fixed function of the configuration: resuming at batch N skips N batches' worth of
raw samples (before decoding) and continues exactly where an uninterrupted run would be.

A bad sample (truncated tar, undecodable image, missing field) is logged with its key and shard,
counted and skipped, as open_clip's webdataset pipeline does; past ``max_bad_samples`` the stream
yields a stop batch (``{"stop": message}``) and the loop ends the run with that message. Each batch
carries ``stream``: the worker, how many raw samples it has pulled, and how many it skipped; a
checkpoint records these, so a resume fast-forwards exactly past what was consumed, bad samples
included.

The authors' data recipe (``hr_condition_probability``): a sample drawn by ``hr_condition_draw``,
a pure function of (seed, step, key), is conditioned on its HR image instead of its upsampled LR
image and on the HR image's quality caption instead of the LR image's.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Iterator, Sequence

import torch
import webdataset as wds

from ..conditioning import upsample
from ..encoding import npy_load
from ..errors import UserError
from ..io.images import decode_png
from ..seeding import derive_seed


def shard_partition(shards: Sequence[Path], rank: int, world: int, worker: int, workers: int) -> list[Path]:
    """The shards one (rank, worker) pair reads; disjoint across all pairs."""
    if len(shards) < world * workers:
        raise UserError(
            f"{len(shards)} training shards cannot feed {world} processes x {workers} dataloader workers: every worker "
            "needs at least one shard of its own. "
            "Write more, smaller shards (embed from more shards) or use fewer workers."
        )
    return list(shards[rank::world])[worker::workers]


def _shard_urls(shards: list[Path], rng: random.Random, resampled: bool) -> Iterator[dict]:
    while True:
        if resampled:
            yield {"url": str(rng.choice(shards))}
        else:
            order = list(shards)
            rng.shuffle(order)
            for shard in order:
                yield {"url": str(shard)}


HR_CONDITION_STREAM = "train-hr-condition"


def hr_condition_draw(seed: int, step: int, key: str, probability: float) -> bool:
    """Whether sample ``key`` is conditioned on its HR image at optimizer step ``step``: true with
    ``probability``, a pure function of (seed, step, key), so a resumed run draws as an uninterrupted one."""
    if probability <= 0:
        return False
    return derive_seed(seed, HR_CONDITION_STREAM, f"{step}-{key}") / 2.0**63 < probability


def missing_hr_quality(key: str) -> UserError:
    return UserError(
        f"Training sample {key} has no HR quality caption (hr_quality.npy), which train.hr_condition_probability > 0 "
        "needs. Caption the HR images too (`xpsr caption --set caption_hr=true`), rerun `xpsr embed`, or set "
        "hr_condition_probability to 0."
    )


def decode_training_sample(sample: dict, online: bool, hr_quality: bool = False) -> dict:
    """Raw tar fields -> tensors: LR and HR as uint8 [3, h, w] (see ``images_on_device``), embeddings
    (with ``hr_quality`` also the HR image's quality caption, for the HR-as-condition samples)."""
    lr = torch.from_numpy(decode_png(sample["lr.png"])).permute(2, 0, 1)
    hr = torch.from_numpy(decode_png(sample["hr.png"])).permute(2, 0, 1)
    item = {"key": sample["__key__"], "lr": lr, "hr": hr}
    if online:  # the reference practice: captions are encoded in the training loop
        meta = json.loads(sample["json"])
        item["content_text"] = meta["captions"]["content"]
        item["quality_text"] = meta["captions"]["quality"]
        if hr_quality:
            if meta["captions"].get("hr_quality") is None:
                raise missing_hr_quality(item["key"])
            item["hr_quality_text"] = meta["captions"]["hr_quality"]
    else:
        # kept in their stored fp16 until they reach the device (half the bytes to hand over and copy)
        item["content"] = torch.from_numpy(npy_load(sample["content.npy"]))
        item["quality"] = torch.from_numpy(npy_load(sample["quality.npy"]))
        if hr_quality:
            if "hr_quality.npy" not in sample:
                raise missing_hr_quality(item["key"])
            item["hr_quality"] = torch.from_numpy(npy_load(sample["hr_quality.npy"]))
        if "latent.npy" in sample:
            item["latent_moments"] = torch.from_numpy(npy_load(sample["latent.npy"]))
    return item


def images_on_device(
    batch: dict, device, hr_condition: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(condition, hr) on ``device``: the LR batch bicubic-upsampled to HR size in [0, 1] (as inference
    makes it), and HR in [-1, 1].

    ``hr_condition`` (bool [B]) marks samples whose condition is their HR image itself, in [0, 1] at the
    HR size: the authors' recipe, which feeds the stored HR image unchanged (no down- and upsampling).

    Images cross the dataloader's process boundary and the host-to-device copy as uint8, 4x smaller
    than float32 and 64x smaller than the upsampled float condition; conversion and upsampling run
    where the model runs.
    """
    lr = batch["lr"].to(device, non_blocking=True).float() / 255.0
    hr_bytes = batch["hr"].to(device, non_blocking=True)
    hr = hr_bytes.float() / 127.5 - 1.0
    condition = upsample(lr, hr.shape[-1] // lr.shape[-1])
    if hr_condition is not None and bool(hr_condition.any()):
        mask = hr_condition.to(device, non_blocking=True).view(-1, 1, 1, 1)
        condition = torch.where(mask, hr_bytes.float() / 255.0, condition)
    return condition, hr


def collate(items: list[dict]) -> dict:
    batch = {"keys": [item["key"] for item in items]}
    for name in items[0]:
        if name == "key":
            continue
        values = [item[name] for item in items]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class BadSamples:
    """The bad samples one data worker met: counted, and each logged with its shard (and key) once."""

    def __init__(self):
        self.count = 0
        self.replaying = False  # a resume's fast-forward: what it meets was logged by the run it continues

    def tar_error(self, error: Exception) -> bool:
        """webdataset's handler for a truncated or unreadable tar: the rest of that shard is skipped."""
        url = next((a for a in error.args if isinstance(a, str) and a.endswith(".tar")), "?")
        self.count += 1
        if not self.replaying:
            _log_bad(
                f"a damaged tar member in shard {url}: "
                f"{type(error).__name__}: {error.args[0] if error.args else error}"
            )
        return True

    def undecodable(self, raw: dict, error: Exception) -> None:
        """A sample that its tar held but that does not decode (an image, a field)."""
        self.count += 1
        _log_bad(
            f"sample {raw.get('__key__', '?')} in shard {raw.get('__url__', '?')}: "
            f"{type(error).__name__}: {error}"
        )


class TrainingStream(torch.utils.data.IterableDataset):
    """Endless batches for one rank; use with ``DataLoader(stream, batch_size=None, num_workers=W)``."""

    def __init__(
        self,
        shards: Sequence[Path],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle_buffer: int = 256,
        resampled: bool = True,
        skip_batches: int = 0,
        online_encoding: bool = False,
        hr_quality: bool = False,
        max_bad_samples: int = 100,
        resume_state: dict | None = None,
    ):
        """``resume_state``: {worker: {"position": raw samples pulled, "skipped": bad samples}} from a checkpoint;
        without it a resume skips ``skip_batches`` batches' worth of raw samples."""
        super().__init__()
        self.shards = sorted(Path(s) for s in shards)
        if not self.shards:
            raise UserError("No training shards were found. Run `xpsr embed` first.")
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.shuffle_buffer, self.resampled, self.skip_batches = shuffle_buffer, resampled, skip_batches
        self.online_encoding = online_encoding
        self.hr_quality = hr_quality  # also decode the HR images' quality captions (hr_condition_probability > 0)
        self.max_bad_samples = max_bad_samples
        self.resume_state = {int(k): v for k, v in (resume_state or {}).items()}

    def check_workers(self, workers: int) -> None:
        shard_partition(self.shards, self.rank, self.world, 0, max(workers, 1))

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        bad = BadSamples()
        samples = self._raw_samples(worker, workers, bad)
        pulled = self._fast_forward(samples, worker, workers, bad)
        while True:
            items = []
            while len(items) < self.batch_size:
                raw = next(samples)
                pulled += 1
                try:
                    items.append(decode_training_sample(raw, self.online_encoding, self.hr_quality))
                except UserError:
                    raise
                except Exception as error:  # deterministic: the same sample fails in every run
                    bad.undecodable(raw, error)
                if bad.count > self.max_bad_samples:
                    yield {"stop": self._too_many_bad_samples(bad.count, worker)}
                    return
            batch = collate(items)
            batch["stream"] = {"worker": worker, "position": pulled, "skipped": bad.count}
            yield batch

    def _raw_samples(self, worker: int, workers: int, bad: BadSamples) -> Iterator[dict]:
        """The endless raw samples of one worker: its shards in seeded order, through the seeded shuffle buffer."""
        mine = shard_partition(self.shards, self.rank, self.world, worker, workers)
        tag = f"{self.rank}-{worker}-{workers}"
        urls = _shard_urls(mine, random.Random(derive_seed(self.seed, "train-shards", tag)), self.resampled)
        samples = wds.tarfile_to_samples(handler=bad.tar_error)(urls)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(
                self.shuffle_buffer,
                initial=self.shuffle_buffer,
                rng=random.Random(derive_seed(self.seed, "train-shuffle", tag)),
            )(samples)
        return samples

    def _fast_forward(self, samples: Iterator[dict], worker: int, workers: int, bad: BadSamples) -> int:
        """Skips the raw samples that the steps before a resume consumed (none on a fresh start); returns how many."""
        state = self.resume_state.get(worker)
        if state is not None:  # exactly what the checkpointed run had pulled, bad samples included
            pulled = int(state["position"])
        else:  # the DataLoader hands out batches round-robin: batch i comes from worker i % workers
            pulled = len(range(worker, self.skip_batches, workers)) * self.batch_size
        bad.replaying = True
        for _ in range(pulled):
            next(samples)
        bad.replaying = False
        bad.count = int(state["skipped"]) if state is not None else 0  # those were counted (and logged) before
        return pulled

    def _too_many_bad_samples(self, count: int, worker: int) -> str:
        return (
            f"{count} bad training samples were skipped on rank {self.rank}, worker {worker}, more than "
            f"max_bad_samples={self.max_bad_samples}; the training shards are damaged (see the messages above for "
            "keys and shards). Rebuild them with `xpsr embed --overwrite`, or raise max_bad_samples."
        )


def _log_bad(what: str) -> None:
    print(f"Skipping a bad training sample: {what}", file=sys.stderr, flush=True)
