"""Two real gloo ranks (spawned CPU processes) over an uneven number of uneven shards."""

from __future__ import annotations

import json
import socket
from collections import Counter

import pytest
import torch.multiprocessing as mp
from data_helpers import nlvr2_split


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    keys = {
        "train": nlvr2_split(root / "train", [13, 2, 9, 8, 5], "train"),  # 5 shards over 2 ranks x 2 workers
        "val": nlvr2_split(root / "val", [7, 1, 6, 5, 4], "val"),
        "test": nlvr2_split(root / "test", [11], "test"),  # fewer shards than slots: records are split
    }
    return root, keys


def test_two_ranks_equal_train_batches_and_exact_eval(uneven, tokenizer_dir, tmp_path):
    from ddp_helpers import loader_rank

    root, keys = uneven
    out = tmp_path / "result.json"
    mp.spawn(loader_rank, args=(2, _free_port(), str(root), str(tokenizer_dir), str(out)), nprocs=2)
    ranks = json.loads(out.read_text())
    steps = 37 // (4 * 2)
    for r in ranks:
        assert r["len"] == steps and r["train_batches"] == [steps, steps], r["train_batches"]
    # each rank streamed its own shards: the two ranks' training examples differ
    assert set(ranks[0]["train_keys"]) != set(ranks[1]["train_keys"])
    assert set(ranks[0]["train_keys"]) | set(ranks[1]["train_keys"]) <= set(keys["train"])
    for split in ("val", "test"):
        seen = ranks[0][f"{split}_keys"] + ranks[1][f"{split}_keys"]
        assert Counter(seen) == Counter(keys[split]), split  # every example exactly once
        assert ranks[0][f"{split}_keys"] and ranks[1][f"{split}_keys"]


@pytest.mark.slow
def test_lightning_ddp_spawn_fit(uneven, tokenizer_dir, tmp_path):
    from ddp_helpers import lightning_ddp_fit

    root, keys = uneven
    out = tmp_path / "epochs.jsonl"
    lightning_ddp_fit(str(root), str(tokenizer_dir), str(out))
    epochs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(epochs) == 2
    for e, epoch in enumerate(epochs, 1):
        assert epoch["train_batches"] == [4 * e, 4 * e]
        seen = [k for rank_keys in epoch["val_keys"] for k in rank_keys]
        assert Counter(seen) == Counter(keys["val"])
