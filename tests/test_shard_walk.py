"""Every path the input walk meets is accounted for: an index row with a status, or a count by reason."""

from __future__ import annotations

import errno
import json
import os
import pathlib
from pathlib import Path

import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from conftest import photo
from stages.cli import app
from xpsr_core.io import images
from xpsr_core.io.shards import read_shard
from xpsr_core.seeding import derive_seed

AS_ROOT = os.geteuid() == 0
NON_UTF8 = b"caf\xe9-\xff.png"


def make_corpus(root: Path) -> dict:
    root.mkdir()
    Image.fromarray(photo("astronaut", (64, 64))).save(root / "good.png")
    with open(os.path.join(os.fsencode(root), NON_UTF8), "wb") as handle:
        Image.fromarray(photo("rocket", (64, 64))).save(handle, format="PNG")
    (root / "dangling.png").symlink_to(root / "missing.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    Image.fromarray(photo("coffee", (64, 64))).save(root / "locked.png")
    (root / "locked.png").chmod(0)
    (root / "lockeddir").mkdir()
    Image.fromarray(photo("chelsea", (64, 64))).save(root / "lockeddir" / "inner.png")
    (root / "lockeddir").chmod(0)
    os.mkfifo(root / "pipe.jpg")
    (root / "sub").mkdir()
    Image.fromarray(photo("camera", (64, 64))).save(root / "sub" / "deep.png")
    (root / "linked").symlink_to(root / "sub")  # a link to a folder: not followed, counted
    (root / "notes.txt").write_text("not an image")
    (root / "raw.cr2").write_bytes(b"\x00" * 10)
    (root / "sub" / "readme.md").write_text("# readme")
    (root / "gone.txt").symlink_to(root / "nowhere.txt")  # a dangling link without an image extension
    return {"skipped": {"unsupported_extension": 3, "linked_folder": 1, "broken_link": 1}}


def test_every_path_is_a_row_or_a_count_and_nothing_crashes(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    expected = make_corpus(corpus)
    if AS_ROOT:
        # root reads through permissions: deny the read and the listing where the kernel would for a user
        real_read, real_list = pathlib.Path.read_bytes, images._list_dir

        def read_bytes(self):
            if self.name == "locked.png":
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_read(self)

        def list_dir(path):
            if os.path.basename(path) == "lockeddir":
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_list(path)

        monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
        monkeypatch.setattr(images, "_list_dir", list_dir)
    out = tmp_path / "out"
    try:
        result = CliRunner().invoke(app, ["shard", f"mixed={corpus}", "--out", str(out), "--crop-size", "32",
                                          "--images-per-shard", "3", "--set", "max_failure_ratio=1.0"])
    finally:
        (corpus / "locked.png").chmod(0o644)
        (corpus / "lockeddir").chmod(0o755)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    rows = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))], ignore_index=True)
    by_source = rows.set_index("source")
    shown = NON_UTF8.decode("utf-8", "backslashreplace")
    assert by_source["status"].to_dict() == {
        "good.png": "ok",
        shown: "ok",
        "dangling.png": "broken_link",
        "loop.png": "link_loop",
        "locked.png": "unreadable",
        "lockeddir": "unreadable",
        "pipe.jpg": "not_a_file",
        "sub/deep.png": "ok",
    }
    assert all(by_source.loc[name, "error"] for name in by_source.index if by_source.loc[name, "status"] != "ok")
    assert "permission denied" in by_source.loc["locked.png", "error"].lower()
    assert "cannot list folder" in by_source.loc["lockeddir", "error"]
    # the exact bytes of the name, losslessly, and its crop seeded from them
    assert by_source.loc[shown, "source_bytes"] == NON_UTF8
    assert by_source.loc["good.png", "source_bytes"] == b"good.png"
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_paths"] == expected["skipped"]
    assert report["inputs"] == len(rows) == 8 and report["failed"] == 5
    assert "paths skipped (not inputs): broken_link=1, linked_folder=1, unsupported_extension=3" in result.output
    samples = [json.loads(s["json"]) for tar in sorted(out.glob("*.tar")) for s in read_shard(tar)]
    assert {m["source"] for m in samples} == {"good.png", shown, "sub/deep.png"}


def test_non_utf8_names_seed_deterministically_and_valid_names_seed_as_before():
    name = os.fsdecode(b"x\xff.png")
    assert derive_seed(0, "shard", f"d/{name}") == derive_seed(0, "shard", f"d/{name}")
    assert derive_seed(0, "shard", f"d/{name}") != derive_seed(0, "shard", "d/x\\xff.png")
    import hashlib

    expected = int.from_bytes(hashlib.blake2b("0\x1fshard\x1fd/é.png".encode(), digest_size=8).digest(), "little") >> 1
    assert derive_seed(0, "shard", "d/é.png") == expected


def test_walk_counts_and_statuses_without_the_stage(tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus)
    try:
        entries, skipped = images.walk_inputs(corpus)
    finally:
        (corpus / "locked.png").chmod(0o644)
        (corpus / "lockeddir").chmod(0o755)
    statuses = {images.readable_name(e.relative): e.status for e in entries}
    assert statuses["dangling.png"] == "broken_link" and statuses["loop.png"] == "link_loop"
    assert statuses["pipe.jpg"] == "not_a_file" and statuses["good.png"] is None
    if not AS_ROOT:
        assert statuses["lockeddir"] == "unreadable"
    assert dict(skipped) == {"unsupported_extension": 3, "linked_folder": 1, "broken_link": 1}
