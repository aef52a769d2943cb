""":class:`StreamLoader`: batches from a stream through a ``DataLoader``, with skip counts and a resumable epoch."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from .datasets import EvalStream, TrainStream
from .resume import gather_per_rank, merge_rank_states, rank_state, resume_position, resumed_epoch

log = logging.getLogger("pumer_lightning.data")


def _identity(batch: Any) -> Any:
    return batch


class StreamLoader:
    """Iterable over collated batches from a :class:`TrainStream` or :class:`EvalStream`.

    Wraps a ``torch.utils.data.DataLoader`` (``batch_size=None``: workers already yield batches), strips the
    skip counts off every batch and passes them to ``on_skipped``.

    A training loader is resumable mid-epoch: :meth:`state_dict` records the epoch, how many of its batches were
    consumed and where each worker's stream stood after its last consumed batch; after :meth:`load_state_dict`
    the next pass over that epoch yields only the batches that are left, continuing every worker's stream
    where it stopped, so each example of the epoch is seen once. Lightning saves and restores this state with
    the fit loop (the loader is ``Stateful``).

    Args:
        dataset: the stream.
        num_workers, persistent_workers, pin_memory, prefetch_factor: as for ``DataLoader``.
        num_batches: for training, the exact number of batches per epoch (the loader stops there; ``len()``
            returns it). For evaluation leave it None.
        epoch_fn: returns the current epoch (the trainer's); when it returns None, the loader counts epochs
            itself. Passed to the stream before workers start an epoch.
        on_skipped: receives ``{reason: count}`` deltas as they arrive.
        postprocess: applied to each batch in the main process before it is yielded.
        consumed_fn: returns how many batches of the current epoch the consumer has finished with (the trainer's
            progress), or None; default: the batches yielded so far (a consumer that prefetches has finished
            with fewer).
    """

    def __init__(
        self,
        dataset: TrainStream | EvalStream,
        *,
        num_workers: int = 0,
        num_batches: int | None = None,
        persistent_workers: bool = True,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        epoch_fn: Callable[[], int | None] | None = None,
        on_skipped: Callable[[dict[str, int]], None] | None = None,
        multiprocessing_context: str | None = None,
        postprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        consumed_fn: Callable[[], int | None] | None = None,
    ):
        if isinstance(dataset, TrainStream) and num_batches is None:
            raise ValueError("a training stream is endless: num_batches must be given")
        # Not named ``dataset``: Lightning would warn that an IterableDataset's length may be wrong, but this
        # length is exact by construction (training) or computed from the shards themselves (evaluation).
        self.stream = dataset
        self.num_workers = num_workers
        self.num_batches = num_batches
        self.epoch_fn = epoch_fn
        self.on_skipped = on_skipped
        self.postprocess = postprocess
        self.consumed_fn = consumed_fn
        self._epochs_started = 0
        # resumable position (training): epoch in progress, batches yielded in it, and per yielded batch
        # (number in the epoch, worker, examples that worker had pulled, skip counts that came with it)
        self._epoch: int | None = None
        self._first = 0  # batches of the epoch consumed before this pass started (a resumed epoch)
        self._yielded = 0
        self._start_pulls: list[int] = []
        self._trail: list[tuple[int, int, int, dict[str, int]]] = []
        self._resume: dict[str, Any] | None = None
        if isinstance(dataset, TrainStream):
            # sized before any worker starts: workers share this array with the main process
            dataset.set_resume(-1, 0, [0] * max(1, num_workers))
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs["persistent_workers"] = persistent_workers
            kwargs["prefetch_factor"] = prefetch_factor or 2
            kwargs["multiprocessing_context"] = multiprocessing_context
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_identity,
            pin_memory=pin_memory,
            **kwargs,
        )
        self._expected = None if num_batches is not None else dataset.expected_batches(num_workers)

    def __len__(self) -> int:
        if self.num_batches is not None:
            return self.num_batches
        if self._expected is None:
            raise TypeError("the number of evaluation batches is unknown (fewer shards than workers x ranks)")
        return self._expected

    # ------------------------------------------------------------------------------------------ resumable state
    def _layout(self) -> dict[str, int]:
        stream = self.stream
        return {
            "workers": max(1, self.num_workers),
            "rank": stream.rank,
            "world_size": stream.world_size,
            "batch_size": stream.batch_size,
            "num_batches": int(self.num_batches or 0),
        }

    def _consumed(self) -> int:
        """Batches of the current epoch the consumer has finished with (at least those of a resumed start)."""
        consumed = self.consumed_fn() if self.consumed_fn is not None else None
        if consumed is None:
            return self._yielded
        return max(min(int(consumed), self._yielded), self._first)

    def unconsumed_skips(self) -> dict[str, int]:
        """Skip counts that arrived with batches yielded but not yet consumed (already passed to ``on_skipped``);
        a stream resumed from :meth:`state_dict` counts them again."""
        if self._epoch is None:
            return {}
        consumed = self._consumed()
        out: Counter = Counter()
        for number, _, _, skipped in self._trail:
            if number > consumed:
                out.update(skipped)
        return dict(out)

    def _own_state(self) -> dict[str, Any]:
        """This rank's position: the epoch, batches consumed, and where each worker's stream stood after them."""
        if not isinstance(self.stream, TrainStream) or self._epoch is None:
            return dict(self._resume or {})
        consumed = self._consumed()
        pulls = list(self._start_pulls)
        for number, worker, pos, _ in self._trail:
            if number <= consumed:
                pulls[worker] = pos
        return rank_state(self._epoch, consumed, pulls, self._layout())

    def state_dict(self) -> dict[str, Any]:
        """Where the training epoch stands on every rank: ``{}`` for an evaluation loader or before the first epoch.

        ``positions[r]`` is rank ``r``'s position (:mod:`.resume`). Under ``torch.distributed`` every rank must call
        this (Lightning does: a checkpoint is dumped on every rank, then written by rank 0): the ranks' positions
        are gathered, since a rank whose images failed to decode has pulled more examples than its batches hold.
        """
        if not isinstance(self.stream, TrainStream):
            return {}
        return merge_rank_states(gather_per_rank(self._own_state(), self.stream.world_size))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the epoch of ``state_dict`` where it stopped, the next time the loader runs that epoch."""
        self._resume = dict(state_dict) if state_dict else None

    def _start_epoch(self) -> int:
        """Which epoch this pass runs, and where each worker's stream starts in it (set on the stream)."""
        assert isinstance(self.stream, TrainStream)
        epoch = resumed_epoch(self._resume, self.num_batches or 0)
        if epoch is None:
            epoch = self.epoch_fn() if self.epoch_fn is not None else None
            epoch = self._epochs_started if epoch is None else epoch
        self._epochs_started = epoch
        state, self._resume = self._resume, None
        n, pulls = resume_position(state, self._layout(), epoch, self.stream.name)
        self.stream.set_epoch(epoch)
        if n and pulls[0] >= 0:
            self.stream.set_resume(epoch, n, pulls)
            log.info(
                "[%s] resuming epoch %d after batch %d of %d", self.stream.name, epoch, n, self.num_batches
            )
        else:
            self.stream.set_resume(-1, 0, [0] * len(pulls))
        self._epoch, self._first, self._yielded, self._trail = epoch, n, n, []
        self._start_pulls = [max(0, p) for p in pulls]
        return n

    def close(self) -> None:
        """Stop the worker processes now (persistent workers otherwise live until the loader is garbage
        collected, which a reference cycle can delay, and their shutdown then waits on a timeout). The loader
        stays usable: the next pass starts new workers."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = self._start_epoch() if isinstance(self.stream, TrainStream) else 0
        self._epochs_started += 1
        if self.num_batches == 0:
            return
        if self.num_batches is not None and n >= self.num_batches:
            return
        since_last: Counter = Counter()
        for batch in self.loader:
            fatal = batch.get("_fatal")
            if fatal is not None:
                raise RuntimeError(fatal)
            skipped = batch.pop("_skipped", None)
            if skipped:
                since_last.update(skipped)
                if self.on_skipped is not None:
                    self.on_skipped(skipped)
            pos = batch.pop("_pos", None)
            if batch.pop("_empty", False):
                continue
            n += 1
            if pos is not None:
                self._yielded = n
                self._trail.append((n, pos[0], pos[1], dict(since_last)))
                since_last = Counter()
            yield batch if self.postprocess is None else self.postprocess(batch)
            if self.num_batches is not None and n >= self.num_batches:
                return
