"""Bad texts, labels and annotation lines: skipped and counted, never a crash.

- a lone UTF-16 surrogate in a text (the valid JSON escape ``"\\ud83d"``, a truncated emoji) is skipped as
  ``bad_text`` naming the record and shard, in the loader and already in ``data.prepare``;
- SNLI-VE labels of the wrong type (``["entailment"]``, ``{"entailment": 1}``) are ``bad_label`` skips;
- ``data.prepare nlvr2`` skips and lists bad lines (label ``["True"]``, an integer identifier) instead of
  aborting;
- the converter reports and leaves out a truncated image, and rebuilds the shard once the image is repaired.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from data_helpers import image_bytes, record, write_split
from PIL import Image

from pumer_lightning.data import VLDataModule
from pumer_lightning.data.prepare.cli import convert, main

SURROGATE = "\ud83d"  # what json.loads makes of the escape "\ud83d": a str no tokenizer accepts


def dm_for(root: Path, tok: Path, task: str, workers: int = 0) -> VLDataModule:
    return VLDataModule(task=task, data_dir=str(root), tokenizer=str(tok), image_size=16, eval_batch_size=4,
                        num_workers=workers, train_split="val")  # fmt: skip


# ------------------------------------------------------------------------------------------------ FAIL 3 (loader)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_lone_surrogate_is_skipped_as_bad_text(tmp_path, tokenizer_dir, caplog, workers):
    texts = [
        {"text_id": "img0-0", "text": "a red circle", "label": "entailment"},
        {"text_id": "img0-1", "text": f"a smiling face {SURROGATE}", "label": "neutral"},
        {"text_id": "img0-2", "text": "a blue square", "label": "contradiction"},
    ]
    recs = [
        record("img0", texts, [image_bytes()]),
        record("img1", [dict(texts[0], text_id="img1-0")], [image_bytes()]),
    ]
    assert b"\\ud83d" in recs[0]["json"]  # stored as the JSON escape, exactly as a converter would write it
    write_split(tmp_path / "val", "snli_ve", recs, [1, 1], split="val")
    dm = dm_for(tmp_path, tokenizer_dir, "snli_ve", workers)
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.data"):
        keys = [k for b in dm.val_dataloader() for k in b["keys"]]  # tokenised: no TypeError
    assert Counter(keys) == Counter(["img0-0", "img0-2", "img1-0"])
    assert dm.skipped == {"val/bad_text": 1}
    if workers == 0:
        (message,) = [r.getMessage() for r in caplog.records if "bad_text" in r.getMessage()]
        assert "img0-1" in message and "record img0" in message and "snli_ve-val-000000.tar" in message


# ------------------------------------------------------------------------------------------------ FAIL 4
def test_snli_ve_labels_of_the_wrong_type_are_bad_label(tmp_path, tokenizer_dir):
    texts = [
        {"text_id": "a-0", "text": "a circle", "label": ["entailment"]},
        {"text_id": "a-1", "text": "a circle", "label": {"entailment": 1}},
        {"text_id": "a-2", "text": "a circle", "label": 2},
        {"text_id": "a-3", "text": "a circle", "label": "entailment"},
    ]
    write_split(tmp_path / "val", "snli_ve", [record("a", texts, [image_bytes()])], [1], split="val")
    dm = dm_for(tmp_path, tokenizer_dir, "snli_ve")
    batches = list(dm.val_dataloader())
    assert [k for b in batches for k in b["keys"]] == ["a-3"] and batches[0]["labels"].tolist() == [2]
    assert dm.skipped == {"val/bad_label": 3}


def test_nlvr2_labels_of_the_wrong_type_are_bad_label(tmp_path, tokenizer_dir):
    texts = [
        {"text_id": "val-0-0-0", "text": "a circle", "label": ["True"]},
        {"text_id": "val-0-0-1", "text": "a circle", "label": {"True": 1}},
        {"text_id": "val-0-0-2", "text": "a circle", "label": 1},
        {"text_id": "val-0-0-3", "text": "a circle", "label": "True"},
    ]
    write_split(
        tmp_path / "val",
        "nlvr2",
        [record("val-0-0", texts, [image_bytes(), image_bytes()])],
        [1],
        split="val",
    )
    dm = dm_for(tmp_path, tokenizer_dir, "nlvr2")
    assert [k for b in dm.val_dataloader() for k in b["keys"]] == ["val-0-0-3"]
    assert dm.skipped == {"val/bad_label": 3}


# ------------------------------------------------------------------------------------------------ FAIL 3 + 5 (prepare)
def _save(path: Path, color=(200, 0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), color).save(path, "PNG")


@pytest.fixture
def nlvr2_src(tmp_path) -> Path:
    src = tmp_path / "src"
    lines = [
        json.dumps({"identifier": "dev-0-0-0", "sentence": "A good line.", "label": "True"}),
        json.dumps({"identifier": "dev-0-0-1", "sentence": "A list label.", "label": ["True"]}),
        json.dumps({"identifier": "dev-0-0-2", "sentence": "A dict label.", "label": {"True": 1}}),
        json.dumps({"identifier": 1234, "sentence": "An integer identifier.", "label": "False"}),
        json.dumps(
            {"identifier": "dev-1-0-0", "sentence": f"A truncated emoji {SURROGATE}", "label": "True"}
        ),
        json.dumps({"identifier": "dev-1-0-1", "sentence": None, "label": "True"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"identifier": "dev-1-0-2", "sentence": "Another good line.", "label": "false"}),
    ]
    assert "\\ud83d" in lines[4]
    src.mkdir()
    (src / "dev.json").write_text("\n".join(lines) + "\n")
    for pair in ("dev-0-0", "dev-1-0"):
        _save(src / "dev" / f"{pair}-img0.png")
        _save(src / "dev" / f"{pair}-img1.png", (0, 0, 200))
    return src


def test_prepare_nlvr2_skips_and_lists_bad_lines(nlvr2_src, tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "out"
    assert main(["nlvr2", "--src", str(nlvr2_src), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 (bad_label)" in printed and "dev-0-0-1: ['True']" in printed
    assert "skipped 4 (bad_line)" in printed
    assert "dev.json:4" in printed and "dev.json:5" in printed and "not valid Unicode" in printed
    meta = json.loads((out / "val" / "meta.json").read_text())
    assert meta["num_samples"] == 2
    dm = VLDataModule(
        task="nlvr2", data_dir=str(out), tokenizer=str(tokenizer_dir), image_size=16, num_workers=0
    )
    assert sorted(k for b in dm.eval_dataloader("val") for k in b["keys"]) == ["dev-0-0-0", "dev-1-0-2"]
    assert dm.skipped == {}


def test_prepare_reports_a_truncated_image_and_rebuilds_after_repair(nlvr2_src, tmp_path, tokenizer_dir):
    image = nlvr2_src / "dev" / "dev-1-0-img1.png"
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 2])  # truncated: the header is fine, the pixels are not
    out = tmp_path / "out"
    (summary,) = convert("nlvr2", nlvr2_src, out, workers=1, progress=False)
    assert (
        summary.skipped["truncated_image"] == 1
        and str(image) in summary.examples_of_skipped["truncated_image"][0]
    )
    assert summary.samples == 1  # dev-1-0's statement was not written
    image.write_bytes(good)  # repaired
    (again,) = convert("nlvr2", nlvr2_src, out, workers=1, progress=False)
    assert again.shards_written == 1 and again.samples == 2 and "truncated_image" not in again.skipped
    (third,) = convert("nlvr2", nlvr2_src, out, workers=1, progress=False)
    assert third.shards_written == 0 and third.shards_reused == 1  # and stable once repaired
    dm = VLDataModule(
        task="nlvr2", data_dir=str(out), tokenizer=str(tokenizer_dir), image_size=16, num_workers=0
    )
    assert sorted(k for b in dm.eval_dataloader("val") for k in b["keys"]) == ["dev-0-0-0", "dev-1-0-2"]
    assert dm.skipped == {}
