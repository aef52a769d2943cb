from __future__ import annotations

import random
from collections import Counter

import pytest
from data_helpers import nlvr2_split

from pumer_lightning.data import VLDataModule
from pumer_lightning.data.stream import shuffled


def _dm(root, tokenizer_dir, **kw):
    args = dict(task="nlvr2", data_dir=str(root), tokenizer=str(tokenizer_dir), image_size=16, batch_size=4)
    args.update(kw)
    return VLDataModule(**args)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """NLVR2-style data: train 37 examples in 5 uneven shards, val 23 in 5 shards, test 11 in 1 shard."""
    root = tmp_path_factory.mktemp("uneven")
    keys = {
        "train": nlvr2_split(root / "train", [13, 2, 9, 8, 5], "train"),
        "val": nlvr2_split(root / "val", [7, 1, 6, 5, 4], "val"),
        "test": nlvr2_split(root / "test", [11], "test"),
    }
    return root, keys


def test_shuffle_buffer_is_a_permutation():
    items = list(range(100))
    out = list(shuffled(iter(items), 16, random.Random(0)))
    assert sorted(out) == items and out != items
    assert list(shuffled(iter(items), 0, random.Random(0))) == items


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_sees_every_example_once(uneven, tokenizer_dir, workers):
    root, keys = uneven
    dm = _dm(root, tokenizer_dir, num_workers=workers, eval_batch_size=3)
    # val: 5 shards, whole shards per worker; test: 1 shard, so with 2 workers records are split instead
    for split in ("val", "test"):
        loader = dm.eval_dataloader(split)
        seen = [k for b in loader for k in b["keys"]]
        assert Counter(seen) == Counter(keys[split])
        if split == "test" and workers == 2:
            with pytest.raises(TypeError):
                len(loader)  # the per-rank batch count is not known in advance in that mode
        else:
            assert len(loader) == len(list(dm.eval_dataloader(split)))
    assert dm.skipped == {}


def test_train_epoch_length_order_and_labels(uneven, tokenizer_dir):
    root, keys = uneven
    dm = _dm(root, tokenizer_dir, num_workers=2, shuffle_buffer=8, persistent_workers=True)
    assert dm.num_train_samples == 37 and dm.steps_per_epoch() == 37 // 4
    loader = dm.train_dataloader()
    assert len(loader) == 9
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 9 and all(len(b["keys"]) == 4 for b in batches)
        for b in batches:  # labels travel with their text: odd index <-> True ("two")
            for k, label, m in zip(b["keys"], b["labels"].tolist(), b["meta"]):
                assert label == int(k.split("-")[1]) % 2 and ("two" in m["text"]) == bool(label)
        epochs.append([k for b in batches for k in b["keys"]])
    assert epochs[0] != epochs[1]  # a new shard order and shuffle each epoch
    assert len(set(epochs[0])) >= 30  # one epoch covers (nearly) every example once
    again = _dm(root, tokenizer_dir, num_workers=2, shuffle_buffer=8).train_dataloader()
    assert [k for b in again for k in b["keys"]] == epochs[0]  # same seed, same epoch: same stream


def test_split_and_task_errors_name_the_file(uneven, tokenizer_dir, tmp_path):
    root, _ = uneven
    with pytest.raises(FileNotFoundError, match="nope"):
        _dm(tmp_path / "nope", tokenizer_dir).setup("fit")
    with pytest.raises(ValueError, match="holds task 'nlvr2'"):
        _dm(root, tokenizer_dir, task="vqa2").setup("fit")
    with pytest.raises(FileNotFoundError, match="missing_split"):
        _dm(root, tokenizer_dir, val_split="missing_split").setup("validate")
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        _dm(root, tmp_path / "no_tok").setup("fit")


@pytest.mark.parametrize(("world", "workers"), [(3, 0), (2, 1), (6, 0)])
def test_simulated_ranks_get_equal_train_batches(uneven, tokenizer_dir, world, workers):
    """Ranks built by hand in one process: 5 uneven shards over 2, 3 or 6 ranks (6 > 5: record split)."""
    from pumer_lightning.data.collate import Collator
    from pumer_lightning.data.schema import read_split_meta
    from pumer_lightning.data.stream import RecordParser, StreamLoader, TrainStream
    from pumer_lightning.data.transforms import ImageTransform

    root, keys = uneven
    meta = read_split_meta(root / "train")
    steps = max(1, 37 // (2 * world))
    per_rank = []
    for rank in range(world):
        stream = TrainStream(split_dir=root / "train", meta=meta, parser=RecordParser("nlvr2", True, meta.labels),
                             transform=ImageTransform(16), collator=Collator("nlvr2", tokenizer_dir), batch_size=2,
                             rank=rank, world_size=world, shuffle_buffer=4)  # fmt: skip
        batches = list(StreamLoader(stream, num_batches=steps, num_workers=workers))
        assert len(batches) == steps and all(len(b["keys"]) == 2 for b in batches)
        per_rank.append({k for b in batches for k in b["keys"]})
    assert set().union(*per_rank) <= set(keys["train"])
    assert per_rank[0] != per_rank[1]  # ranks read different shards / records


def test_a_split_with_no_usable_example_fails_loudly(tmp_path, tokenizer_dir):
    from data_helpers import record, write_split

    recs = [record(f"r{i}", [{"text_id": f"r{i}", "label": True}], [b"junk", b"junk"]) for i in range(3)]
    write_split(tmp_path / "train", "nlvr2", recs, [3])
    dm = _dm(tmp_path, tokenizer_dir, num_workers=0, batch_size=2, val_split=None)
    with pytest.raises(RuntimeError, match="no usable example"):
        next(iter(dm.train_dataloader()))
    assert dm.skipped == {}  # counts travel with batches; none was produced
