"""``meta.json`` that does not describe its split directory.

- A shard name listed twice (a hand-merged split) was read twice while another shard on disk was never read:
  60 predictions with 36 distinct ids and nothing reported. It is now an error naming both.
- A ``*.tar`` file in the split directory that no entry lists is an error naming it.
- A ``meta.json`` entry listing more records than a complete shard holds counted examples "lost" although every
  example was read; the warning now gives records / examples read vs listed and nothing is counted.
- A shard cut short exactly at a member boundary (no end-of-archive marker) still counts the examples it lost.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from data_helpers import image_bytes, record

from pumer_lightning.data import VLDataModule
from pumer_lightning.data.schema import ShardInfo, SplitMeta, shard_name, write_split_meta
from pumer_lightning.data.writer import write_shard


def records(prefix: str, n: int) -> list[dict]:
    """``n`` NLVR2 records of one statement each (text ids ``<prefix>-<i>-0-0``)."""
    out = []
    for i in range(n):
        key = f"{prefix}-{i}-0"
        texts = [{"text_id": f"{key}-0", "text": "there is a circle", "label": bool(i % 2)}]
        out.append(record(key, texts, [image_bytes((i, 0, 0), (12, 12)), image_bytes((0, i, 0), (12, 12))]))
    return out


def write_listed(split_dir: Path, shards: list[list[dict]], listed: list[tuple[int, int]]) -> list[str]:
    """Write ``shards`` to disk; ``meta.json`` lists ``(shard index, records claimed)`` per entry."""
    split_dir.mkdir(parents=True, exist_ok=True)
    names = [shard_name("nlvr2", "val", i) for i in range(len(shards))]
    for name, recs in zip(names, shards):
        write_shard(split_dir / name, recs)
    infos = [ShardInfo(names[i], n, n) for i, n in listed]
    meta = SplitMeta.from_shards(task="nlvr2", split="val", dataset="test", shards=infos, labeled=True,
                                 labels=["False", "True"])  # fmt: skip
    write_split_meta(split_dir, meta)
    return names


def dm_for(root: Path, tok: Path, **kw) -> VLDataModule:
    args = dict(task="nlvr2", data_dir=str(root), tokenizer=str(tok), image_size=16, batch_size=4, eval_batch_size=4,
                num_workers=0, train_split="val", val_split="val", test_split="val")  # fmt: skip
    args.update(kw)
    return VLDataModule(**args)


def keys(recs: list[dict]) -> list[str]:
    return [t["text_id"] for r in recs for t in json.loads(r["json"])["texts"]]


def test_a_shard_listed_twice_is_an_error_naming_it_and_the_unlisted_one(tmp_path, tokenizer_dir):
    shards = [records("a", 6), records("b", 6)]
    names = write_listed(tmp_path / "val", shards, [(0, 6), (0, 6)])  # b's entry overwritten by a's
    for stage in ("validate", "test", "fit"):
        with pytest.raises(ValueError) as info:
            dm_for(tmp_path, tokenizer_dir).setup(stage)
        message = str(info.value)
        assert str(tmp_path / "val" / "meta.json") in message, message
        assert f"shard {names[0]} is listed 2 times (shards[0], shards[1])" in message, message
        assert f"listed by no entry: {names[1]}" in message, message
        assert len(message.splitlines()) == 1


def test_a_shard_on_disk_that_no_entry_lists_is_an_error(tmp_path, tokenizer_dir):
    shards = [records("a", 4), records("b", 4), records("c", 4)]
    names = write_listed(tmp_path / "val", shards, [(0, 4), (2, 4)])
    (tmp_path / "val" / f".{names[1]}.tmp").write_bytes(b"")  # a shard being written: hidden, not a shard
    with pytest.raises(ValueError, match=rf"1 shard file\(s\) on disk are listed by no entry: {names[1]}\."):
        dm_for(tmp_path, tokenizer_dir).setup("validate")
    (tmp_path / "val" / names[1]).unlink()
    dm = dm_for(tmp_path, tokenizer_dir)
    assert Counter(k for b in dm.eval_dataloader("val") for k in b["keys"]) == Counter(
        keys(shards[0]) + keys(shards[2])
    )


def test_a_train_split_listed_twice_is_an_error(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match=r"train_split lists 'val' more than once"):
        dm_for(tmp_path, tokenizer_dir, train_split=["val", "val"])


class KeyRecorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[str] = []

    def test_step(self, batch, batch_idx):
        self.seen += batch["keys"]


def test_meta_listing_more_records_than_a_complete_shard_holds_loses_nothing(tmp_path, tokenizer_dir, caplog):
    """Shard 1 holds 4 records, its entry says 7: all 10 examples are tested, nothing is counted as skipped,
    and the warning gives read vs listed without the word "lost"."""
    shards = [records("a", 6), records("b", 4)]
    names = write_listed(tmp_path / "val", shards, [(0, 6), (1, 7)])
    dm, model = dm_for(tmp_path, tokenizer_dir), KeyRecorder()
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.data"):
        pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False).test(model, datamodule=dm)  # fmt: skip
    assert Counter(model.seen) == Counter(keys(shards[0]) + keys(shards[1]))
    assert dm.skipped == {}
    warned = [r.getMessage() for r in caplog.records if names[1] in r.getMessage()]
    assert warned and all(
        "records / examples read 4 / 4 vs listed 7 / 7 in its meta.json" in m for m in warned
    ), warned
    assert not any("lost" in m.replace("nothing is lost", "") for m in warned), warned


def test_a_shard_cut_at_a_member_boundary_counts_what_it_lost(tmp_path, tokenizer_dir, caplog):
    """The same disagreement with the end-of-archive marker gone (the file cut after record 2 of 6): the 4
    examples that the listed count says are missing are counted as shard_error, naming the shard."""
    shards = [records("a", 4), records("b", 6)]
    names = write_listed(tmp_path / "val", shards, [(0, 4), (1, 6)])
    path = tmp_path / "val" / names[1]
    with tarfile.open(path) as tar:
        cut = min(
            m.offset for m in tar.getmembers() if m.name.startswith("b-2-0.")
        )  # record 2's first header
    path.write_bytes(path.read_bytes()[:cut])
    dm = dm_for(tmp_path, tokenizer_dir)
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.data"):
        seen = [k for b in dm.eval_dataloader("val") for k in b["keys"]]
    assert Counter(seen) == Counter(keys(shards[0]) + keys(shards[1])[:2])
    assert dm.skipped == {"val/shard_error": 4}
    assert f"cut short at byte {cut}" in caplog.text and "records read 2 vs 6 listed" in caplog.text
    assert "out of date" not in caplog.text
