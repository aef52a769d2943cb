"""Code run inside spawned ranks by test_ddp.py (a plain module, so spawned processes can import it)."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import lightning.pytorch as pl
import torch
import torch.distributed as dist


def loader_rank(rank: int, world: int, port: int, root: str, tokenizer: str, out: str) -> None:
    """One rank: stream two training epochs with a collective per batch, then validation and test."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # A short timeout turns a rank that runs out of batches into a test failure rather than a hang.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from pumer_lightning.data import VLDataModule

    dm = VLDataModule(task="nlvr2", data_dir=root, tokenizer=tokenizer, image_size=16, batch_size=4,
                      eval_batch_size=3, num_workers=2, shuffle_buffer=4)  # fmt: skip
    result = {"rank": rank, "train_batches": [], "train_keys": [], "len": None}
    loader = dm.train_dataloader()
    result["len"] = len(loader)
    for _ in range(2):
        n = 0
        for batch in loader:
            total = torch.tensor([float(len(batch["keys"]))])
            dist.all_reduce(total)  # stands in for DDP's gradient all-reduce: every rank must call it
            result["train_keys"] += batch["keys"]
            n += 1
        result["train_batches"].append(n)
    result["val_keys"] = [k for b in dm.val_dataloader() for k in b["keys"]]
    result["test_keys"] = [k for b in dm.test_dataloader() for k in b["keys"]]
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


class Recorder(pl.LightningModule):
    """One linear layer; records per rank how many training batches and which validation keys it saw."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.layer = torch.nn.Linear(3, 1)
        self.train_batches, self.val_keys = 0, []

    def training_step(self, batch, batch_idx):
        self.train_batches += 1
        x = batch["pixel_values"].mean(dim=(1, 3, 4))
        return self.layer(x).square().mean()

    def validation_step(self, batch, batch_idx):
        self.val_keys += batch["keys"]

    def on_validation_epoch_end(self):
        keys = [None] * self.trainer.world_size
        dist.all_gather_object(keys, self.val_keys)
        counts = [None] * self.trainer.world_size
        dist.all_gather_object(counts, self.train_batches)
        if self.trainer.is_global_zero:
            with open(self.out, "a") as f:
                f.write(json.dumps({"val_keys": keys, "train_batches": counts}) + "\n")
        self.val_keys = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def lightning_ddp_fit(root: str, tokenizer: str, out: str) -> None:
    """Lightning's own ddp_spawn over two CPU processes; rank 0 appends what every rank saw per epoch."""
    from pumer_lightning.data import VLDataModule

    dm = VLDataModule(task="nlvr2", data_dir=root, tokenizer=tokenizer, image_size=16, batch_size=4,
                      eval_batch_size=3, num_workers=1, shuffle_buffer=4)  # fmt: skip
    trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(Recorder(out), datamodule=dm)
