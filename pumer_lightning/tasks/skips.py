"""A task module's report of the examples its data dropped.

The data module's `SkipLedger` is the one account of dropped examples (docs/data.md#vldatamodule): the loaders add to
it, checkpoints save it. The task module, which holds the ledger from the `DataFacts` it was handed at setup, is
the one reporter of it:

* every evaluation pass (``val``, ``test``, ``predict``) warns its own split's counts, summed over ranks;
* ``validate`` logs them as ``data/skipped/<split>/<reason>``;
* ``fit`` (when a training epoch ends) and ``test`` log the ledger's totals on this rank under the same tags;
* ``test`` and ``predict`` write ``<prediction file>.skipped.json`` next to their predictions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl

from pumer_lightning.data.facts import DataFacts

log = logging.getLogger("pumer_lightning.tasks")


class SkipReport:
    """Reports the examples dropped during each evaluation pass of a task module (module doc)."""

    def __init__(self) -> None:
        self._marks: dict[str, dict[str, int]] = {}

    def begin(self, stage: str, facts: DataFacts) -> None:
        """An evaluation pass of ``stage`` starts: remember where the ledger stands."""
        ledger = facts.skip_ledger
        self._marks[stage] = ledger.mark() if ledger is not None else {}

    def end(self, stage: str, facts: DataFacts, module: pl.LightningModule) -> dict[str, int]:
        """Examples of the stage's split skipped during this pass, ``{reason: count}`` summed over ranks; warned,
        and logged in ``validate``. Call it on every rank (it gathers under DDP)."""
        mark = self._marks.pop(stage, {})
        split = facts.split(stage)
        trainer = module.trainer
        ledger = facts.skip_ledger
        skipped = ledger.since(mark, split, trainer.world_size) if ledger is not None else {}
        if trainer.sanity_checking:
            return skipped
        if skipped and trainer.is_global_zero:
            by_reason = dict(sorted(skipped.items()))
            total = sum(skipped.values())
            log.warning(
                "[%s] %d example(s) of split %r skipped, by reason: %s", stage, total, split, by_reason
            )
        if stage == "val" and getattr(trainer.state, "fn", None) == "validate":
            for reason, n in sorted(skipped.items()):
                module.log(f"data/skipped/{split}/{reason}", float(n), batch_size=1, sync_dist=False)
        return skipped

    @staticmethod
    def log_totals(facts: DataFacts, module: pl.LightningModule) -> None:
        """Log every count of the ledger on this rank as ``data/skipped/<split>/<reason>``."""
        if facts.skip_ledger is None:
            return
        for key, count in sorted(facts.skip_ledger.totals().items()):
            module.log(f"data/skipped/{key}", float(count), batch_size=1, sync_dist=False)


def write_skip_summary(
    path: Path, stage: str, split: str | None, predictions: int, skipped: dict[str, int]
) -> Path:
    """``<predictions file>.skipped.json`` next to a prediction file: how many examples of the split it covers and
    how many were skipped, by reason (the prediction formats themselves have no room for it)."""
    out = path.with_name(path.name + ".skipped.json")
    summary = {
        "stage": stage,
        "split": split,
        "predictions": predictions,
        "skipped_total": sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
    }
    out.write_text(json.dumps(summary, indent=1) + "\n")
    return out
