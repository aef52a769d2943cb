"""Why examples get dropped, counting and logging them in a loader process (:class:`SkipCounter`), and the one
account of a data module's counts (:class:`SkipLedger`)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from .resume import gather_per_rank

log = logging.getLogger("pumer_lightning.data")

#: Why an example can be dropped. ``shard_error`` counts unreadable or truncated shards (one per shard read).
SKIP_REASONS: dict[str, str] = {
    "shard_error": "the tar shard could not be read to its end (truncated, missing or not a tar)",
    "missing_json": "the record has no .json member",
    "bad_json": "the .json member is not valid JSON or lacks required fields",
    "missing_image": "an image member (img0/img1) is absent",
    "decode_error": "an image could not be decoded",
    "truncated_image": "an image file is truncated",
    "missing_text": "a text entry has no (or an empty) text",
    "bad_text": "a text (or its text_id) is not valid Unicode, e.g. a lone UTF-16 surrogate such as \\ud83d",
    "missing_label": "a text entry of a labelled split has no label",
    "bad_label": "a label is not in the label vocabulary or has the wrong type",
}


class SkipCounter:
    """Counts dropped examples by reason in one process and logs the events behind them.

    An *event* is one call of :meth:`skip`: a record with a bad image, a bad text entry, a whole shard that could
    not be read. The first ``log_limit`` events per reason are warnings naming the record key, the shard and the
    error, whatever the number of examples each one lost (a 0-byte shard losing 500 examples is one event, and
    the one most worth seeing); later events of that reason go to DEBUG, announced once by a warning. The counts
    (:attr:`total`) are examples.
    """

    def __init__(self, split: str, log_limit: int = 20):
        self.split = split
        self.log_limit = log_limit
        self.total: Counter = Counter()
        self.events: Counter = Counter()
        self._pending: Counter = Counter()
        #: While True, skips are neither counted nor logged: a resumed training stream replays (without decoding)
        #: the part of the epoch that was already consumed, whose skips were counted before the interruption.
        self.muted = False

    def skip(self, reason: str, key: str, shard: str, detail: str = "", n: int = 1) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        if self.muted:
            return
        self.total[reason] += n
        self._pending[reason] += n
        self.events[reason] += 1
        level = logging.WARNING if self.events[reason] <= self.log_limit else logging.DEBUG
        if log.isEnabledFor(level):
            suffix = f": {detail}" if detail else ""
            message = "[%s] skipped %d example(s), reason %s, key %s in %s%s"
            log.log(level, message, *(self.split, n, reason, key, shard, suffix))
        if self.events[reason] == self.log_limit:
            log.warning(
                "[%s] %d %s events logged in this process; further ones are logged at DEBUG level (logger %s), "
                "their examples still counted",
                *(self.split, self.log_limit, reason, log.name),
            )

    def take(self) -> dict[str, int]:
        """Counts since the last call (what still has to reach the main process)."""
        out = dict(self._pending)
        self._pending.clear()
        return out


class SkipLedger:
    """The one account of the examples a data module dropped: ``{"<split>/<reason>": count}`` for this process.

    Counts come in from the loaders: each loader process counts what its stream drops (:class:`SkipCounter`),
    the counts travel with the batches, and :class:`StreamLoader` hands them to :meth:`recorder` of their split.
    Everything else reads this ledger: ``VLDataModule.skipped`` (the totals), checkpoints (:meth:`state`,
    :meth:`restore`: every rank's counts) and the task module, which reports each evaluation pass's own counts
    (:meth:`mark` when the pass starts, :meth:`since` when it ends). The ledger is never replaced, only updated,
    so a reference handed out once stays current (a resumed run restores into it).
    """

    def __init__(self) -> None:
        self._counts: Counter = Counter()

    def recorder(self, split: str) -> Callable[[dict[str, int]], None]:
        """What the loader of ``split`` calls with ``{reason: count}`` as the counts arrive."""

        def record(counts: dict[str, int]) -> None:
            self.add(split, counts)

        return record

    def add(self, split: str, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self._counts[f"{split}/{reason}"] += n

    def totals(self) -> dict[str, int]:
        """Every count so far, ``{"<split>/<reason>": count}``."""
        return dict(self._counts)

    def mark(self) -> dict[str, int]:
        """The counts now, for :meth:`since` at the end of a pass."""
        return dict(self._counts)

    def since(self, mark: dict[str, int], split: str | None, world_size: int = 1) -> dict[str, int]:
        """``{reason: count}`` of ``split`` added after ``mark``, summed over ``world_size`` ranks (under
        ``torch.distributed`` a collective: every rank calls it). Empty for ``split`` None."""
        prefix = f"{split}/"
        own = {
            key[len(prefix) :]: n - mark.get(key, 0)
            for key, n in self._counts.items()
            if split is not None and key.startswith(prefix) and n > mark.get(key, 0)
        }
        total: Counter = Counter()
        for part in gather_per_rank(own, world_size):
            total.update(part)
        return dict(total)

    def state(self, world_size: int, pending: dict[str, int] | None = None) -> dict[str, Any]:
        """What a checkpoint saves: this rank's counts less ``pending`` (counts of batches fetched but not yet
        consumed) as ``skipped``, and every rank's as ``skipped_by_rank`` (gathered: every rank calls it)."""
        counts = Counter(self._counts)
        counts.subtract(pending or {})
        own = {k: v for k, v in counts.items() if v > 0}
        return {"skipped": own, "skipped_by_rank": gather_per_rank(own, world_size)}

    def restore(self, state: dict[str, Any], rank: int, world_size: int) -> None:
        """This rank's counts from a saved :meth:`state`. Saved by as many ranks: its own. Saved by another number
        of ranks (or, as before the counts were saved per rank, by rank 0 alone): rank 0 takes every count saved
        and the other ranks start from zero, so that the sum over ranks stays the total."""
        by_rank = state.get("skipped_by_rank")
        if by_rank and len(by_rank) == world_size:
            counts = by_rank[rank] or {}
        elif rank != 0:
            counts = {}
        elif not by_rank:
            counts = state.get("skipped", {})
        else:
            counts = Counter()
            for part in by_rank:
                counts.update(part or {})
        self._counts.clear()
        self._counts.update(counts)
