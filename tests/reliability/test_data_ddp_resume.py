"""A mid-epoch resume continues every rank's stream exactly.

Only rank 0's stream position was saved: the other ranks assumed that no image of theirs had failed to decode
before the stop. After SIGTERM and a resume from ``interrupted.ckpt``, a rank that had skipped an undecodable
image repeated some examples of the epoch and left as many out. Every rank's position (and every rank's skip
counts) is now saved and restored.

- fast: ranks simulated in one process; their loader states merged as a checkpoint holds them; each rank's
  resumed stream continues exactly where it stopped;
- slow: two real gloo processes under Lightning's ``ddp``, SIGTERM at a step after undecodable images on both
  ranks, ``PreemptionCheckpoint``'s ``interrupted.ckpt``, then ``fit(ckpt_path=...)``: on every rank, the batches
  (example ids) of the two runs together equal those of an uninterrupted run, and so do the skip counts.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from data_helpers import image_bytes, record

from pumer_lightning.data import VLDataModule
from pumer_lightning.data.schema import ShardInfo, SplitMeta, shard_name, write_split_meta
from pumer_lightning.data.writer import write_shard

SHARDS, PER_SHARD, BATCH = 8, 10, 2
STEPS = SHARDS * PER_SHARD // (BATCH * 2)  # 20 per rank and epoch over 2 ranks
STOP = 7


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """80 NLVR2 examples in 8 shards; every fifth record's left image does not decode."""
    root = tmp_path_factory.mktemp("ddp_resume")
    split_dir = root / "train"
    split_dir.mkdir()
    infos = []
    for s in range(SHARDS):
        recs = []
        for i in range(PER_SHARD):
            key = f"train{s}-{i}-0"
            texts = [{"text_id": f"{key}-0", "text": "there is a circle", "label": bool(i % 2)}]
            left = b"not an image" if i % 5 == 2 else image_bytes((s, i, 0), (12, 12))
            recs.append(record(key, texts, [left, image_bytes((0, s, i), (12, 12))]))
        name = shard_name("nlvr2", "train", s)
        write_shard(split_dir / name, recs)
        infos.append(ShardInfo(name, PER_SHARD, PER_SHARD))
    meta = SplitMeta.from_shards(task="nlvr2", split="train", dataset="test", shards=infos, labeled=True,
                                 labels=["False", "True"])  # fmt: skip
    write_split_meta(split_dir, meta)
    return root


# ------------------------------------------------------------------------------------------------ fast
def _loader(root: Path, tok: Path, rank: int):
    from pumer_lightning.data.collate import Collator
    from pumer_lightning.data.schema import read_split_meta
    from pumer_lightning.data.stream import RecordParser, StreamLoader, TrainStream
    from pumer_lightning.data.transforms import ImageTransform

    meta = read_split_meta(root / "train")
    stream = TrainStream(split_dir=root / "train", meta=meta, parser=RecordParser("nlvr2", True, meta.labels),
                         transform=ImageTransform(16), collator=Collator("nlvr2", tok), batch_size=BATCH, rank=rank,
                         world_size=2, shuffle_buffer=4)  # fmt: skip
    return StreamLoader(stream, num_batches=STEPS, num_workers=2)


def test_per_rank_positions_round_trip_in_one_process(data, tokenizer_dir, caplog):
    from pumer_lightning.data.stream import merge_rank_states

    reference = {r: [b["keys"] for b in _loader(data, tokenizer_dir, r)] for r in (0, 1)}
    first, states = {}, []
    for r in (0, 1):
        loader = _loader(data, tokenizer_dir, r)
        batches = iter(loader)
        first[r] = [next(batches)["keys"] for _ in range(STOP)]
        states.append(loader.state_dict())
        del batches
    saved = merge_rank_states(states)  # what a checkpoint holds: one state, every rank's position
    assert [p["batches"] for p in saved["positions"]] == [STOP, STOP]
    for r in (0, 1):  # each rank pulled more examples than its batches hold: an image failed to decode
        assert sum(saved["positions"][r]["pulls"]) > STOP * BATCH, saved["positions"][r]
    for r in (0, 1):
        loader = _loader(data, tokenizer_dir, r)
        loader.load_state_dict(saved)
        rest = [b["keys"] for b in loader]
        assert first[r] + rest == reference[r], f"rank {r}"

    # a checkpoint written before positions were saved per rank: rank 1 says what it has to assume
    legacy = {k: v for k, v in saved.items() if k != "positions"}
    loader = _loader(data, tokenizer_dir, 1)
    loader.load_state_dict(legacy)
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.data"):
        rest = [b["keys"] for b in loader]
    assert len(rest) == STEPS - STOP and "holds no stream position for rank 1" in caplog.text


def test_merging_states_of_different_epochs_is_an_error(data, tokenizer_dir):
    from pumer_lightning.data.stream import merge_rank_states

    states = []
    for r in (0, 1):
        loader = _loader(data, tokenizer_dir, r)
        batches = iter(loader)
        next(batches)
        states.append(loader.state_dict())
        del batches
    states[1]["epoch"] = 1
    with pytest.raises(ValueError, match="loader states of rank 0 and rank 1 differ in 'epoch': 0 vs 1"):
        merge_rank_states(states)


def test_skip_counts_restore_per_rank(data, tokenizer_dir):
    by_rank = [{"train/decode_error": 2}, {"train/decode_error": 3, "train/bad_label": 1}]
    state = {"skipped": by_rank[0], "skipped_by_rank": by_rank, "train_stream": {}}
    dm = VLDataModule(
        task="nlvr2", data_dir=str(data), tokenizer=str(tokenizer_dir), val_split=None, test_split=None
    )
    dm.load_state_dict(state)  # one process resumes what two ranks saved: it takes the total
    assert dm.skipped == {"train/decode_error": 5, "train/bad_label": 1}
    dm.load_state_dict({**state, "skipped_by_rank": [by_rank[1]]})
    assert dm.skipped == by_rank[1]


# ------------------------------------------------------------------------------------------------ slow: 2 ranks
class TinyModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["pixel_values"].float().mean(dim=(1, 3, 4))).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Record(pl.Callback):
    """Keys of every training batch and the skip counts after it; SIGTERM to its own process after step
    ``sigterm_at`` (every rank does it, as a scheduler signals every process of a job)."""

    def __init__(self, sigterm_at: int = 0):
        self.sigterm_at, self.batches, self.skipped = sigterm_at, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(list(batch["keys"]))
        self.skipped.append(dict(trainer.datamodule.skipped))
        if self.sigterm_at and trainer.global_step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)


def _fit(root: str, tok: str, run_dir: Path, record: Record, ckpt_path: str | None = None) -> VLDataModule:
    from pumer_lightning.callbacks import PreemptionCheckpoint

    dm = VLDataModule(task="nlvr2", data_dir=root, tokenizer=tok, image_size=16, batch_size=BATCH, num_workers=2,
                      shuffle_buffer=4, val_split=None, test_split=None)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run_dir),
                         callbacks=[PreemptionCheckpoint(dirpath=str(run_dir / "ckpt")), record])  # fmt: skip
    trainer.fit(TinyModel(), datamodule=dm, ckpt_path=ckpt_path)
    return dm


def _rank(rank: int, port: int, root: str, tok: str, out: str) -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
    torch.set_num_threads(1)
    logging.getLogger("pumer_lightning.data").setLevel(logging.ERROR)
    out_dir = Path(out)
    result = {}
    reference = Record()
    result["reference_skipped"] = dict(_fit(root, tok, out_dir / "ref", reference).skipped)
    first = Record(sigterm_at=STOP)
    try:
        _fit(root, tok, out_dir / "run", first)
        raise AssertionError("SIGTERM did not stop the fit")
    except SIGTERMException:
        pass
    saved = out_dir / "run" / "ckpt" / "interrupted.ckpt"
    result["saved"] = torch.load(saved, map_location="cpu", weights_only=False)["global_step"]
    second = Record()
    result["resumed_skipped"] = dict(_fit(root, tok, out_dir / "run", second, ckpt_path=str(saved)).skipped)
    result.update(reference=reference.batches, reference_skips=reference.skipped, first=first.batches,
                  second=second.batches)  # fmt: skip
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow  # three 2-process Lightning fits in two spawned processes
def test_sigterm_and_resume_under_ddp_continue_every_rank_exactly(data, tokenizer_dir, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(data), str(tokenizer_dir), str(tmp_path)), nprocs=2)
    for r in (0, 1):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        reference = result["reference"]
        assert len(reference) == STEPS and result["saved"] == STOP
        # an image of this rank failed to decode before the stop (so its stream pulled more than it delivered)
        assert result["reference_skips"][STOP - 2].get("train/decode_error", 0) > 0, f"rank {r}"
        assert len(result["first"]) == STOP, f"rank {r}"
        assert result["first"] + result["second"] == reference, f"rank {r}: other batches than uninterrupted"
        assert result["resumed_skipped"] == result["reference_skipped"], f"rank {r}"
