"""Skip logging by events.

The per-reason warning limit counted examples, so one event that lost more than 20 examples at once (a 0-byte
shard, a JPEG renamed ``.tar``) went to DEBUG and the shard was never named. Now the first 20 events per reason
are warnings naming the shard, the key and the error, whatever their size.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_helpers import image_bytes, record

from pumer_lightning.data import VLDataModule
from pumer_lightning.data.schema import ShardInfo, SplitMeta, shard_name, write_split_meta
from pumer_lightning.data.writer import write_shard


def records(prefix: str, n: int, bad_image: bool = False) -> list[dict]:
    out = []
    for i in range(n):
        key = f"{prefix}-{i}-0"
        texts = [{"text_id": f"{key}-0", "text": "there is a circle", "label": bool(i % 2)}]
        left = b"not an image" if bad_image else image_bytes((i, 0, 0), (12, 12))
        out.append(record(key, texts, [left, image_bytes((0, i, 0), (12, 12))]))
    return out


def write_val(split_dir: Path, shards: list[list[dict]]) -> list[Path]:
    split_dir.mkdir(parents=True, exist_ok=True)
    infos, paths = [], []
    for i, recs in enumerate(shards):
        name = shard_name("nlvr2", "val", i)
        write_shard(split_dir / name, recs)
        infos.append(ShardInfo(name, len(recs), len(recs)))
        paths.append(split_dir / name)
    meta = SplitMeta.from_shards(task="nlvr2", split="val", dataset="test", shards=infos, labeled=True,
                                 labels=["False", "True"])  # fmt: skip
    write_split_meta(split_dir, meta)
    return paths


def evaluate(root: Path, tok: Path, caplog) -> tuple[list[str], dict[str, int]]:
    dm = VLDataModule(task="nlvr2", data_dir=str(root), tokenizer=str(tok), image_size=16, eval_batch_size=4,
                      num_workers=0, val_split="val")  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger="pumer_lightning.data"):
        keys = [k for b in dm.eval_dataloader("val") for k in b["keys"]]
    return keys, dm.skipped


def test_whole_shard_losses_larger_than_the_limit_are_warnings_naming_shard_and_error(
    tmp_path, tokenizer_dir, caplog
):
    """Two shards of 30 and 25 examples lost whole (0 bytes; a JPEG under the shard's name) next to a good one."""
    paths = write_val(tmp_path / "val", [records("a", 30), records("b", 4), records("c", 25)])
    paths[0].write_bytes(b"")
    paths[2].write_bytes(image_bytes((1, 2, 3), (40, 40), "JPEG"))
    keys, skipped = evaluate(tmp_path, tokenizer_dir, caplog)
    assert len(keys) == 4 and skipped == {"val/shard_error": 55}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for path, n in ((paths[0], 30), (paths[2], 25)):
        named = [m for m in warnings if f"in {path.name}:" in m]
        assert len(named) == 1, warnings
        assert f"skipped {n} example(s), reason shard_error, key after (none)" in named[0]
        assert "ReadError" in named[0] and "records read 0 vs" in named[0], named[0]


def test_the_first_20_events_per_reason_are_warnings_then_one_notice(tmp_path, tokenizer_dir, caplog):
    write_val(tmp_path / "val", [records("bad", 23, bad_image=True), records("good", 5)])
    keys, skipped = evaluate(tmp_path, tokenizer_dir, caplog)
    assert len(keys) == 5 and skipped == {"val/decode_error": 23}
    events = [r for r in caplog.records if "reason decode_error" in r.getMessage()]
    assert [r.levelno for r in events] == [logging.WARNING] * 20 + [logging.DEBUG] * 3
    assert all("nlvr2-val-000000.tar: img0: " in r.getMessage() for r in events)
    notices = [r.getMessage() for r in caplog.records if "further ones are logged at DEBUG" in r.getMessage()]
    assert len(notices) == 1 and "20 decode_error events" in notices[0]
