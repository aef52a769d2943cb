"""Bad data and interruptions in training: nothing lost, nothing silent.

- A corrupt (0-byte) shard that is the only shard of a loader slot (two shards, two workers; or two DDP ranks)
  must not stop training: the slot reads the good shards, the bad one is counted.
- Only when no shard of the split holds a usable example does training stop, with one message.
- A run resumed from a mid-epoch checkpoint continues the epoch's stream where it stopped: together with the
  interrupted run it sees exactly the batches of one uninterrupted run, each example of the epoch once, and
  its skip counts equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import socket
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from data_helpers import image_bytes, record

from pumer_lightning.data import VLDataModule
from pumer_lightning.data.schema import ShardInfo, SplitMeta, shard_name, write_split_meta
from pumer_lightning.data.writer import write_shard


def nlvr2_records(prefix: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        key = f"{prefix}-{i}-0"
        texts = [{"text_id": f"{key}-0", "text": "there is a circle", "label": bool(i % 2)}]
        out.append(
            record(
                key, texts, [image_bytes((i % 250, 9, 0), (12, 12)), image_bytes((0, i % 250, 9), (12, 12))]
            )
        )
    return out


def write_train(root: Path, shards: list[list[dict]]) -> list[str]:
    """A train split of the given shards (meta.json counts one example per record); returns the shard paths."""
    split_dir = root / "train"
    split_dir.mkdir(parents=True, exist_ok=True)
    infos, paths = [], []
    for i, recs in enumerate(shards):
        name = shard_name("nlvr2", "train", i)
        write_shard(split_dir / name, recs)
        infos.append(ShardInfo(name, len(recs), len(recs)))
        paths.append(split_dir / name)
    meta = SplitMeta.from_shards(task="nlvr2", split="train", dataset="test", shards=infos, labeled=True,
                                 labels=["False", "True"])  # fmt: skip
    write_split_meta(split_dir, meta)
    return paths


def dm_for(root: Path, tok: Path, **kw) -> VLDataModule:
    args = dict(task="nlvr2", data_dir=str(root), tokenizer=str(tok), image_size=16, batch_size=4, num_workers=0,
                shuffle_buffer=4, val_split=None, test_split=None)  # fmt: skip
    args.update(kw)
    return VLDataModule(**args)


class BatchRecorder(pl.LightningModule):
    """One linear layer; records the keys of every training batch, in order."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.batches: list[list[str]] = []

    def training_step(self, batch, batch_idx):
        self.batches.append(list(batch["keys"]))
        return self.layer(batch["pixel_values"].float().mean(dim=(1, 3, 4))).square().mean()

    def configure_optimizers(self):
        # sized like the tasks' schedules: Lightning then starts the training iterator before restoring its loops
        total = self.trainer.estimated_stepping_batches
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (total + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def trainer(root: Path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(root), enable_checkpointing=False)  # fmt: skip
    args.update(kw)
    return pl.Trainer(**args)


# ------------------------------------------------------------------------------------------------ FAIL 2
def test_a_corrupt_shard_alone_in_its_worker_slot_does_not_stop_training(tmp_path, tokenizer_dir):
    good = nlvr2_records("train0", 8)
    paths = write_train(tmp_path, [good, nlvr2_records("train1", 8)])
    paths[1].write_bytes(b"")  # 0 bytes: worker 1's only shard
    dm = dm_for(tmp_path, tokenizer_dir, num_workers=2)
    model = BatchRecorder()
    trainer(tmp_path, max_epochs=2).fit(model, datamodule=dm)
    assert len(model.batches) == 2 * (16 // 4)  # every step of both epochs ran
    assert {k for b in model.batches for k in b} <= {f"train0-{i}-0-0" for i in range(8)}
    skipped = dm.skipped
    lost = skipped.pop("train/shard_error")
    assert lost > 0 and lost % 8 == 0  # each read of the empty shard: the 8 examples meta.json says it holds
    assert skipped == {}


def _ddp_rank(rank: int, port: int, root: str, tok: str, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    dm = VLDataModule(task="nlvr2", data_dir=root, tokenizer=tok, image_size=16, batch_size=2, num_workers=0,
                      shuffle_buffer=4, val_split=None, test_split=None)  # fmt: skip
    keys, batches = [], 0
    for batch in dm.train_dataloader():
        total = torch.tensor([float(len(batch["keys"]))])
        dist.all_reduce(total)  # DDP's gradient all-reduce: a rank that stops early would hang its peer
        keys += batch["keys"]
        batches += 1
    gathered = [None, None]
    dist.all_gather_object(gathered, {"keys": keys, "batches": batches, "skipped": dm.skipped})
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about a minute on a busy 2-core machine
def test_a_corrupt_shard_alone_on_a_ddp_rank_does_not_stop_training(tmp_path, tokenizer_dir):
    import torch.multiprocessing as mp

    paths = write_train(tmp_path, [nlvr2_records("train0", 8), nlvr2_records("train1", 8)])
    paths[1].write_bytes(b"")  # rank 1's only shard
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ranks.json"
    mp.spawn(_ddp_rank, args=(port, str(tmp_path), str(tokenizer_dir), str(out)), nprocs=2)
    ranks = json.loads(out.read_text())
    for r in ranks:
        assert r["batches"] == 16 // (2 * 2)
        assert set(r["keys"]) <= {f"train0-{i}-0-0" for i in range(8)}
    lost = [
        r["skipped"].pop("train/shard_error", 0) for r in ranks
    ]  # the rank whose slot drew the empty shard
    assert sum(lost) > 0 and all(n % 8 == 0 for n in lost) and all(r["skipped"] == {} for r in ranks)


def test_no_usable_example_anywhere_stops_with_one_message(tmp_path, tokenizer_dir):
    paths = write_train(tmp_path, [nlvr2_records("train0", 4), nlvr2_records("train1", 4)])
    for p in paths:
        p.write_bytes(b"")
    loader = dm_for(tmp_path, tokenizer_dir, num_workers=2).train_dataloader()
    with pytest.raises(RuntimeError) as info:
        next(iter(loader))
    message = str(info.value)
    assert "no usable example in any of the 2 shard(s)" in message and str(tmp_path / "train") in message
    assert "DataLoader worker" not in message and "Traceback" not in message
    assert "shard_error" in message


def test_undecodable_images_everywhere_stop_with_one_message_not_a_hang(tmp_path, tokenizer_dir):
    recs = [dict(r, **{"img0.png": b"not an image"}) for r in nlvr2_records("train0", 6)]
    write_train(tmp_path, [recs[:3], recs[3:]])
    loader = dm_for(tmp_path, tokenizer_dir, num_workers=0, shuffle_buffer=0).train_dataloader()
    with pytest.raises(RuntimeError, match="no usable example in any of the 2 shard"):
        next(iter(loader))


def test_a_run_of_undecodable_images_is_skipped_not_taken_for_a_dead_slot(tmp_path, tokenizer_dir, caplog):
    recs = nlvr2_records("train0", 12)
    for i in range(4):
        recs[i] = dict(recs[i], **{"img0.png": b"not an image"})
    write_train(tmp_path, [recs])
    dm = dm_for(tmp_path, tokenizer_dir, num_workers=0, shuffle_buffer=0, batch_size=2)
    with caplog.at_level("WARNING", logger="pumer_lightning.data"):
        keys = [k for b in dm.train_dataloader() for k in b["keys"]]
    # 6 steps of 2 = 12 examples: the 8 good ones, then (a new pass: the 4 bad ones skipped again) 4 more
    assert keys == [f"train0-{i}-0-0" for i in [*range(4, 12), *range(4, 8)]]
    assert dm.skipped == {"train/decode_error": 8} and "reads every shard" not in caplog.text


# ------------------------------------------------------------------------------------------------ mid-epoch resume
@pytest.mark.parametrize("stop_at", [3, 8, 13])
def test_mid_epoch_resume_continues_the_epoch_stream(tmp_path, tokenizer_dir, stop_at):
    """40 examples in 3 shards (one record with an undecodable image), batch 4, 2 workers: 10 steps per epoch,
    2 epochs. A run stopped after ``stop_at`` steps (13: in the second epoch) (a checkpoint saved by ModelCheckpoint at that step) and
    resumed from that checkpoint runs exactly the batches of the uninterrupted run, in order: the rest of the
    interrupted epoch is neither replayed nor lost, and every skip is counted once."""
    recs = nlvr2_records("train0", 16) + nlvr2_records("train1", 12) + nlvr2_records("train2", 12)
    recs[5] = dict(recs[5], **{"img0.png": b"\x89PNG\r\n\x1a\n broken"})
    write_train(tmp_path, [recs[:16], recs[16:28], recs[28:]])

    def dm():
        return dm_for(tmp_path, tokenizer_dir, num_workers=2, shuffle_buffer=6)

    reference, ref_dm = BatchRecorder(), dm()
    trainer(tmp_path / "a", max_epochs=2).fit(reference, datamodule=ref_dm)
    assert len(reference.batches) == 20

    ckpt_dir = tmp_path / "b" / "ckpt"
    save = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=stop_at, save_top_k=-1,
                                        filename="step{step}")  # fmt: skip
    first = BatchRecorder()
    trainer(tmp_path / "b", max_epochs=2, max_steps=stop_at, callbacks=[save], enable_checkpointing=True).fit(
        first, datamodule=dm()
    )
    (ckpt,) = ckpt_dir.glob("*.ckpt")
    second, resumed_dm = BatchRecorder(), dm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path / "b", max_epochs=2).fit(second, datamodule=resumed_dm, ckpt_path=str(ckpt))
    assert not [w for w in caught if "not resumable" in str(w.message)]
    assert first.batches[:stop_at] == reference.batches[:stop_at]
    assert first.batches[:stop_at] + second.batches == reference.batches
    start = stop_at // 10 * 10  # the interrupted epoch: its examples, each seen as often as uninterrupted
    epoch = Counter(k for b in reference.batches[start : start + 10] for k in b)
    resumed = first.batches[start:stop_at] + second.batches[: start + 10 - stop_at]
    assert Counter(k for b in resumed for k in b) == epoch
    assert resumed_dm.skipped == ref_dm.skipped and ref_dm.skipped.get("train/decode_error", 0) > 0
