"""Streaming shards into batches: splitting over ranks and workers, skip-and-count, equal epochs.

Two datasets share the reading code (:mod:`.datasets`):

- :class:`TrainStream` is endless. Every pass over the shards uses a shard order drawn from ``(seed, epoch,
  pass)``, identical on every rank, then each (rank, worker) *slot* takes its share. The loader stops each
  epoch after exactly ``num_samples // (batch_size * world_size)`` batches, counted in the main process, so every
  rank runs the same number of steps whatever the shard sizes (uneven shards would otherwise hang DDP).
- :class:`EvalStream` makes one pass; every record goes to exactly one slot, so each example is seen exactly
  once across ranks and workers, and the last batch of each worker may be short.

Slots get whole shards when there are at least as many shards as slots (``world_size * num_workers``);
otherwise every slot reads all shards and keeps the records whose global index falls on it, which is slower
but still exact.

Bad data never stops a run. Each dropped example is counted by reason (:data:`SKIP_REASONS`, :mod:`.skips`) and
logged with its record key and shard; the counts travel to the main process inside the batches (``"_skipped"``)
where :class:`StreamLoader` (:mod:`.loader`) hands them to the data module's :class:`SkipLedger`, the one
account of them.

The modules, one idea each: :mod:`.skips` (skip reasons, counting, logging, the ledger), :mod:`.shards` (reading a shard,
checking it against ``meta.json``), :mod:`.records` (a record into examples), :mod:`.datasets` (the two streams),
:mod:`.loader` (the loader), :mod:`.resume` (every rank's position in a checkpoint) and :mod:`.retrieval`
(retrieval captions). Their public names are importable from here.
"""

from __future__ import annotations

from .datasets import EvalStream, NoUsableData, TrainStream, shuffled
from .loader import StreamLoader
from .records import RecordParser, decode_example_images, unicode_problem
from .resume import gather_per_rank, merge_rank_states, rank_position
from .retrieval import RetrievalTexts, scan_retrieval_texts
from .shards import ShardClaim, count_shard, read_shard, record_info, tar_end, warn_counts
from .skips import SKIP_REASONS, SkipCounter, SkipLedger

__all__ = [
    "SKIP_REASONS",
    "EvalStream",
    "NoUsableData",
    "RecordParser",
    "RetrievalTexts",
    "ShardClaim",
    "SkipCounter",
    "SkipLedger",
    "StreamLoader",
    "TrainStream",
    "count_shard",
    "decode_example_images",
    "gather_per_rank",
    "merge_rank_states",
    "rank_position",
    "read_shard",
    "record_info",
    "scan_retrieval_texts",
    "shuffled",
    "tar_end",
    "unicode_problem",
    "warn_counts",
]
