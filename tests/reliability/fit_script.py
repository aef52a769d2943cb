"""A tiny SNLI-VE shapes fit/validate run as its own process (what test_fit_ddp.py and test_resume.py launch).

It builds the same objects the CLI builds (task module, `VLDataModule`, Trainer with checkpointing) so that the
tests exercise real process launching, gloo collectives, real SIGTERM and Lightning's checkpoint resolution.
Lightning's ``ddp`` strategy re-launches this file for rank 1, so it must stay a plain script.

    python fit_script.py fit --data-dir D --tokenizer T --root R [--devices 2] [--ckpt-path last] [--step-sleep S]
    python fit_script.py validate --data-dir D --tokenizer T --root R --ckpt-path R/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from pumer_lightning.data import VLDataModule  # noqa: E402
from pumer_lightning.data.collate import load_tokenizer  # noqa: E402
from pumer_lightning.reduce import ReducerSchedule  # noqa: E402
from pumer_lightning.tasks import BackboneSpec, OptimConfig, SNLIVETask  # noqa: E402


class CountVal(pl.Callback):
    """Validation examples seen and the summed probability of their true label, reduced over ranks.

    The probability sum moves with every weight and every example, so equal sums under 1 and 2 processes mean
    the same examples were scored once each (accuracy alone can tie by chance).
    """

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.seen, self.prob, self.keys = 0, 0.0, []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, *args) -> None:
        with torch.no_grad():
            logits = pl_module(batch).float()
        self.prob += logits.softmax(-1).gather(1, batch["labels"].view(-1, 1)).sum().item()
        self.seen += len(batch["labels"])
        self.keys += list(batch["keys"])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        totals = trainer.strategy.reduce(torch.tensor([float(self.seen), self.prob], dtype=torch.float64),
                                         reduce_op="sum")  # fmt: skip
        self.total, self.prob_sum = int(totals[0].item()), float(totals[1].item())
        keys = [self.keys]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            keys = [None] * trainer.world_size
            torch.distributed.all_gather_object(keys, self.keys)
        self.all_keys = [k for rank_keys in keys for k in rank_keys]


class Progress(pl.Callback):
    """Writes the global step after every training batch (the resume test waits for it) and can slow steps."""

    def __init__(self, path: Path, sleep: float):
        self.path, self.sleep, self.batches = path, sleep, 0

    def on_train_batch_end(self, trainer, *args) -> None:
        self.batches += 1
        if trainer.is_global_zero:
            self.path.write_text(str(trainer.global_step))
        if self.sleep:
            time.sleep(self.sleep)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["fit", "validate"])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--max-epochs", type=int, default=2)
    p.add_argument("--ckpt-path", default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--num-workers", type=int, default=1)
    # Task hyperparameters are dataclasses (BackboneSpec, ReducerSchedule, ...), which torch.load's default
    # weights_only=True refuses; "default" leaves Lightning's default to show that failure.
    p.add_argument("--weights-only", default="false", choices=["false", "default"])
    args = p.parse_args()
    args.weights_only = False if args.weights_only == "false" else None

    pl.seed_everything(0, workers=True)
    torch.set_num_threads(1)
    task = SNLIVETask(
        backbone=BackboneSpec(
            "vilt_tiny", tokenizer=args.tokenizer, vocab_size=len(load_tokenizer(args.tokenizer))
        ),
        reducer=ReducerSchedule(layers=[1, 2], keep_ratio=0.7, merge_ratio=0.2, text_merge_ratio=0.2),
        optim=OptimConfig(lr=1e-3, lr_mult_head=1.0),
    )
    dm = VLDataModule(
        task="snli_ve", data_dir=args.data_dir, tokenizer=args.tokenizer, image_size=96, max_text_len=16,
        batch_size=8, eval_batch_size=7, num_workers=args.num_workers, shuffle_buffer=16,
    )  # fmt: skip
    ckpt_dir = args.root / "checkpoints"  # fixed, so that a restarted run finds last.ckpt / preempted.ckpt
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.max_epochs,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=args.root,
        logger=CSVLogger(args.root, name=args.mode),
        callbacks=[
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="epoch{epoch}",
                auto_insert_metric_name=False,
                save_top_k=-1,
                save_last=True,
            ),  # fmt: skip
            OnExceptionCheckpoint(dirpath=ckpt_dir, filename="preempted"),
            progress := Progress(args.root / "progress.txt", args.step_sleep),
            count := CountVal(),
        ],
    )
    if args.mode == "fit":
        trainer.fit(task, datamodule=dm, ckpt_path=args.ckpt_path, weights_only=args.weights_only)
    else:
        trainer.validate(
            task, datamodule=dm, ckpt_path=args.ckpt_path, verbose=False, weights_only=args.weights_only
        )
    if trainer.is_global_zero:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        result = {"global_step": trainer.global_step, "world_size": trainer.world_size, "metrics": metrics,
                  "val_samples": getattr(count, "total", None), "val_prob_sum": getattr(count, "prob_sum", None),
                  "val_keys": getattr(count, "all_keys", None), "batches_run": progress.batches,
                  "checkpoints": sorted(p.name for p in ckpt_dir.glob("*.ckpt"))}  # fmt: skip
        (args.root / f"{args.mode}-result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
