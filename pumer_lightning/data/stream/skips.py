"""Why examples get dropped, and counting and logging them in a loader process (:class:`SkipCounter`)."""

from __future__ import annotations

import logging
from collections import Counter

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
