"""``make tune``'s cache loses nothing to a bad line: a line of non-UTF-8 bytes or a figure of the wrong shape is
skipped and counted, with one warning naming the file; every other figure still comes from the cache and only the
lost one is measured again (a line cut off mid-way by an interrupted write was already handled, and still is)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pumer_test_utils import run_args

from pumer_lightning.cli import PumerCLI
from pumer_lightning.tune import run

TINY_SEARCH = (
    "--candidates=2", "--min-finalists=4", "--rounds=1", "--final-rounds=1", "--playoff-rounds=1",
    "--generations=0", "--layers=1,2", "--keep=0.7", "--merge=0,0.2", "--text-merge=0", "--device=cpu",
    "--check-split=none",
)  # fmt: skip


@pytest.fixture(scope="module")
def fitted(shapes, tmp_path_factory) -> list[str]:
    """The arguments of a ``vilt_tiny`` shapes VQA run fitted for two steps (its checkpoint is the default)."""
    out = tmp_path_factory.mktemp("tune_cache")
    args = run_args("vqa2", "vilt_tiny", shapes, out / "runs", "--trainer.limit_train_batches=2",
                    "--trainer.max_epochs=1", "--trainer.limit_val_batches=1")  # fmt: skip
    PumerCLI(args=["fit", *args])
    return args


@pytest.mark.slow  # two searches end to end; the store's rules are fast tests (tests/lab/test_cache.py)
def test_unreadable_cache_lines_are_skipped_counted_and_named(fitted, tmp_path, caplog):
    cache = tmp_path / "cache.jsonl"
    search = [*fitted, *TINY_SEARCH, f"--cache={cache}", f"--out={tmp_path / 'out'}"]
    first = run(search)
    lines = cache.read_bytes().splitlines(keepends=True)
    damaged = next(i for i, line in enumerate(lines) if json.loads(line)["key"]["kind"] == "accuracy")
    entry = json.loads(lines[damaged])
    lines[damaged] = json.dumps({**entry, "value": [entry["value"]["value"]]}).encode() + b"\n"  # wrong shape
    lines.insert(1, b'{"id": "\xff\xfe", "value": {"value": 1.0}}\n')  # not UTF-8
    cache.write_bytes(b"".join(lines))
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.lab.cache"):
        again = run(search)
    warnings = [r.getMessage() for r in caplog.records if r.name == "pumer_lightning.lab.cache"]
    assert len(warnings) == 1 and f"{cache}: skipped 2 unreadable line(s)" in warnings[0]
    assert again["cache"]["misses"] == {"accuracy": 1, "timing": 0}
    assert again["recommendation"]["key"] == first["recommendation"]["key"]
    assert [p["accuracy"][-1]["value"] for p in again["points"]] == [
        p["accuracy"][-1]["value"] for p in first["points"]
    ]
    assert Path(cache).read_bytes().count(b"\n") == len(lines) + 1  # the figure measured again, appended
