"""Where a training epoch stands on every rank: the loader state a checkpoint holds, and continuing from it.

A rank's *position* is the epoch, the batches consumed and, per loader worker, how many examples that worker's
stream had pulled (more than its batches hold when images failed to decode). Each rank saves its own; under
``torch.distributed`` they are gathered into one state (:func:`gather_per_rank`, :func:`merge_rank_states`), so
the checkpoint that rank 0 writes lets every rank continue exactly (:func:`rank_position`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("pumer_lightning.data")


def gather_per_rank(obj: Any, world_size: int) -> list[Any]:
    """``obj`` of every rank, in rank order, when ``torch.distributed`` runs ``world_size`` ranks (a collective:
    every rank must call it); else ``[obj]`` (one process, or ranks simulated in one process)."""
    dist = torch.distributed
    if (
        world_size > 1
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() == world_size
    ):
        out: list[Any] = [None] * world_size
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One training-loader state holding the ``positions`` of every rank, from the states of the ranks' loaders.

    The first non-empty state gives the epoch and layout; every other must agree with it (a ValueError says
    where not). A rank without a position keeps ``None``, which :func:`rank_position` reports.
    """
    states = [s for s in states if s]
    if not states:
        return {}
    out = dict(states[0])
    if "positions" not in out:
        return out
    positions = list(out["positions"])
    for state in states[1:]:
        for key in ("epoch", "workers", "world_size", "batch_size", "num_batches"):
            if state.get(key) != out.get(key):
                raise ValueError(
                    f"loader states of rank {out.get('rank')} and rank {state.get('rank')} differ in {key!r}: "
                    f"{out.get(key)!r} vs {state.get(key)!r}"
                )
        for r, position in enumerate(state.get("positions") or []):
            if position is not None:
                positions[r] = position
    out["positions"] = positions
    return out


def rank_position(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """Rank ``rank``'s saved position in a loader state, or None when the state lacks it (a state written before
    positions were saved per rank, or by another number of ranks)."""
    positions = state.get("positions") or []
    if state.get("world_size") == world_size and len(positions) == world_size:
        position = positions[rank]
        if position is not None and position.get("epoch", state.get("epoch")) == state.get("epoch"):
            return position
    if "positions" not in state and state.get("rank") == rank:
        return {"batches": state.get("batches", 0), "pulls": state.get("pulls", [])}
    return None


def rank_state(epoch: int, batches: int, pulls: list[int], layout: dict[str, int]) -> dict[str, Any]:
    """The loader state of one rank: its position, alone in ``positions`` until the ranks' states are merged.

    ``layout`` (workers, rank, world_size, batch_size, num_batches) says whether a later run can continue it."""
    positions: list[dict[str, Any] | None] = [None] * layout["world_size"]
    positions[layout["rank"]] = {"epoch": epoch, "batches": batches, "pulls": pulls}
    return {"epoch": epoch, "batches": batches, "pulls": pulls, **layout, "positions": positions}


def resumed_epoch(state: dict[str, Any] | None, num_batches: int) -> int | None:
    """The epoch a loaded state continues: its own when it stopped inside it, else the next one (None: no state).

    Taken from the state rather than from the trainer's epoch count, so that the continued epoch does not depend
    on when the caller (a trainer restoring its loops, or a script without one) updates its own count.
    """
    if not state or "epoch" not in state:
        return None
    done = int(state.get("batches", 0)) >= int(state.get("num_batches") or num_batches or 0)
    return int(state["epoch"]) + (1 if done else 0)


def resume_position(
    state: dict[str, Any] | None, layout: dict[str, int], epoch: int, name: str
) -> tuple[int, list[int]]:
    """(batches already consumed, examples pulled per worker) for a pass over ``epoch`` of a loader laid out as
    ``layout``; ``(0, zeros)`` to start the epoch afresh, ``(batches, -1s)`` when the saved layout differs (the
    rest of the epoch comes from a fresh stream, with a warning). ``name`` names the split in messages."""
    workers, num_batches = layout["workers"], layout["num_batches"]
    if not state or state.get("epoch") != epoch:
        return 0, [0] * workers
    own = rank_position(state, layout["rank"], layout["world_size"])
    batches = int((own or state).get("batches", 0))
    if not 0 < batches < num_batches:
        return 0, [0] * workers
    if any(state.get(k) != layout[k] for k in ("workers", "world_size", "batch_size", "num_batches")):
        log.warning(
            "[%s] the checkpoint's loader layout %s differs from this run's %s: the rest of epoch %d (%d of %d "
            "batches) is drawn from the start of the epoch's stream, so some of its examples repeat",
            *(name, {k: state.get(k) for k in layout}, layout, epoch, num_batches - batches, num_batches),
        )
        return batches, [-1] * workers
    if own is not None:
        pulls = [int(p) for p in own.get("pulls", [])][:workers]
        return batches, pulls + [0] * (workers - len(pulls))
    log.warning(
        "[%s] the checkpoint holds no stream position for rank %d (only rank %s's, as written before positions "
        "were saved per rank): this rank continues epoch %d as if no image had failed to decode in its first %d "
        "batches; if some did, a few of its examples repeat and as many are left out",
        *(name, layout["rank"], state.get("rank"), epoch, batches),
    )
    # the DataLoader asks workers round-robin: without failures, worker v pulled a batch's worth per batch it gave
    size = layout["batch_size"]
    return batches, [
        (batches // workers + (1 if v < batches % workers else 0)) * size for v in range(workers)
    ]
