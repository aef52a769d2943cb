"""Bad data at evaluation time: nothing lost, nothing silent.

Every case builds its own tiny split, runs it through the real entry points (a Lightning ``Trainer`` with
``VLDataModule``) and asserts what was evaluated, what was skipped and how it was counted:

- ``meta.json`` that understates a shard's examples, or says ``records: 0`` for a shard that holds records, must
  not shorten evaluation (its counts are a claim, checked against the shards, never a limit on reading);
- a shard listed in ``meta.json`` but missing on disk is skipped and counted (``shard_error``), not a crash;
- a wrong-typed or missing ``meta.json`` field stops with one message naming the file and the field;
- a record whose ``.json`` member is missing or broken counts every example it lost;
- ``validate`` and ``predict`` report their skip counts, and prediction files say how many were skipped.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from data_helpers import image_bytes, record

from pumer_lightning.data import VLDataModule
from pumer_lightning.data.schema import ShardInfo, SplitMeta, shard_name, write_split_meta
from pumer_lightning.data.writer import write_shard


def nlvr2_records(prefix: str, n: int, texts: int = 1) -> list[dict]:
    """``n`` NLVR2 records of ``texts`` statements each (text ids ``<prefix>-<i>-0-<j>``)."""
    out = []
    for i in range(n):
        key = f"{prefix}-{i}-0"
        entries = [
            {
                "text_id": f"{key}-{j}",
                "text": f"there is {'one' if j % 2 else 'a'} circle",
                "label": bool((i + j) % 2),
            }
            for j in range(texts)
        ]
        out.append(
            record(
                key, entries, [image_bytes((i % 250, 0, 0), (12, 12)), image_bytes((0, i % 250, 0), (12, 12))]
            )
        )
    return out


def write_claimed(
    split_dir: Path, shards: list[tuple[list[dict], int, int]], task="nlvr2", split="val"
) -> None:
    """Write shards of raw records with the (records, samples) counts ``meta.json`` is to claim for each."""
    split_dir.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, (records, n_records, n_samples) in enumerate(shards):
        name = shard_name(task, split, i)
        write_shard(split_dir / name, records)
        infos.append(ShardInfo(name, n_records, n_samples))
    labels = {"nlvr2": ["False", "True"], "snli_ve": ["contradiction", "neutral", "entailment"]}[task]
    meta = SplitMeta.from_shards(
        task=task, split=split, dataset="test", shards=infos, labeled=True, labels=labels
    )
    write_split_meta(split_dir, meta)


def keys_of(records: list[dict]) -> list[str]:
    return [t["text_id"] for r in records for t in json.loads(r["json"])["texts"]]


def dm_for(root: Path, tok: Path, workers: int = 0, task: str = "nlvr2", **kw) -> VLDataModule:
    args = dict(task=task, data_dir=str(root), tokenizer=str(tok), image_size=16, batch_size=4, eval_batch_size=4,
                num_workers=workers, val_split="val", test_split="val", predict_split="val")  # fmt: skip
    args.update(kw)
    return VLDataModule(**args)


class KeyRecorder(pl.LightningModule):
    """Records the example keys each evaluation stage sees."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: dict[str, list[str]] = {"val": [], "test": [], "predict": []}

    def validation_step(self, batch, batch_idx):
        self.seen["val"] += batch["keys"]

    def test_step(self, batch, batch_idx):
        self.seen["test"] += batch["keys"]

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        self.seen["predict"] += batch["keys"]
        return batch["keys"]


def trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


# ------------------------------------------------------------------------------------------------ FAIL 1
def test_understated_meta_counts_never_shorten_evaluation(tmp_path, tokenizer_dir, caplog):
    """60 examples in 5 shards of 6 records x 2 texts; meta.json says shard 1 holds 4 examples (not 12) and
    shard 3 holds no record at all. Validation, test and predict must each see all 60, and the two stale
    entries are named in a warning."""
    shards = [nlvr2_records(f"val{s}", 6, texts=2) for s in range(5)]
    claims = [(recs, 6, 12) for recs in shards]
    claims[1] = (shards[1], 6, 4)
    claims[3] = (shards[3], 0, 0)
    write_claimed(tmp_path / "val", claims)
    want = Counter(k for recs in shards for k in keys_of(recs))
    assert sum(want.values()) == 60
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.data"):
        model = KeyRecorder()
        trainer().validate(model, datamodule=dm_for(tmp_path, tokenizer_dir))
        trainer().test(model, datamodule=dm_for(tmp_path, tokenizer_dir))
        predicted = trainer().predict(model, datamodule=dm_for(tmp_path, tokenizer_dir, workers=2))
    for stage in ("val", "test", "predict"):
        assert Counter(model.seen[stage]) == want, stage
    assert Counter(k for keys in predicted for k in keys) == want
    stale = {r.getMessage().split()[0] for r in caplog.records if "vs listed" in r.getMessage()}
    assert {Path(p).name for p in stale} == {"nlvr2-val-000001.tar", "nlvr2-val-000003.tar"}


def test_eval_length_comes_from_the_shards(tmp_path, tokenizer_dir):
    shards = [nlvr2_records(f"val{s}", 5) for s in range(4)]
    write_claimed(tmp_path / "val", [(recs, 1, 1) for recs in shards])  # every claim far too small
    for workers in (0, 2):
        loader = dm_for(tmp_path, tokenizer_dir, workers=workers).eval_dataloader("val")
        batches = list(loader)
        assert len(loader) == len(batches)
        assert sum(len(b["keys"]) for b in batches) == 20


# ------------------------------------------------------------------------------------------------ missing shard
def test_a_shard_missing_on_disk_is_skipped_and_counted(tmp_path, tokenizer_dir, caplog):
    shards = [nlvr2_records(f"val{s}", 4) for s in range(3)]
    write_claimed(tmp_path / "val", [(recs, 4, 4) for recs in shards])
    (tmp_path / "val" / "nlvr2-val-000001.tar").unlink()
    dm = dm_for(tmp_path, tokenizer_dir)
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.data"):
        dm.setup("validate")
        model = KeyRecorder()
        trainer().validate(model, datamodule=dm)
    assert Counter(model.seen["val"]) == Counter(keys_of(shards[0]) + keys_of(shards[2]))
    assert dm.skipped == {"val/shard_error": 4}  # the 4 examples meta.json says the missing shard holds
    assert "missing on disk: nlvr2-val-000001.tar" in caplog.text


def test_a_split_with_every_shard_missing_is_an_error(tmp_path, tokenizer_dir):
    write_claimed(tmp_path / "val", [(nlvr2_records("val", 2), 2, 2)])
    (tmp_path / "val" / "nlvr2-val-000000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="missing on disk: nlvr2-val-000000.tar"):
        dm_for(tmp_path, tokenizer_dir).setup("validate")


# ------------------------------------------------------------------------------------------------ meta.json fields
@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.update(num_samples=None), "num_samples"),
        (lambda m: m.update(num_records="8"), "num_records"),
        (lambda m: m.update(shards=5), "shards"),
        (lambda m: m["shards"][0].pop("records"), "shards[0].records"),
        (lambda m: m["shards"][0].update(samples=[4]), "shards[0].samples"),
        (lambda m: m["shards"][0].update(name=7), "shards[0].name"),
        (lambda m: m.update(labels="False,True"), "labels"),
        (lambda m: m.pop("task"), "task"),
    ],
)
def test_meta_json_field_errors_name_the_file_and_field(tmp_path, tokenizer_dir, edit, field):
    write_claimed(tmp_path / "val", [(nlvr2_records("val", 2), 2, 2)])
    path = tmp_path / "val" / "meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as info:
        dm_for(tmp_path, tokenizer_dir).setup("validate")
    message = str(info.value)
    assert str(path) in message and field in message, message
    assert len(message.splitlines()) == 1


# ------------------------------------------------------------------------------------------------ lost json
def test_a_record_without_readable_json_counts_every_lost_example(tmp_path, tokenizer_dir, caplog):
    """A record whose .json member is missing (3 texts) or not JSON (2 texts): its texts are unknown, so the
    examples it lost come from the shard's meta.json count, not 1 per record."""
    good = nlvr2_records("val0", 3, texts=3)
    lost = nlvr2_records("val1", 2, texts=3)
    nojson = {k: v for k, v in lost[0].items() if k != "json"}
    broken = dict(lost[1], json=b'{"texts": [{"text_id": "val1-1-0-0", "text": "a"}, {"te')  # 2 texts, cut
    write_claimed(tmp_path / "val", [(good + [nojson], 4, 12), (nlvr2_records("val2", 1) + [broken], 2, 3)])
    dm = dm_for(tmp_path, tokenizer_dir)
    with caplog.at_level(logging.WARNING, logger="pumer_lightning.data"):
        seen = [k for b in dm.eval_dataloader("val") for k in b["keys"]]
    assert len(seen) == 9 + 1
    assert dm.skipped == {"val/missing_json": 3, "val/bad_json": 2}
    assert "val1-0-0" in caplog.text and "val1-1-0" in caplog.text and "nlvr2-val-000000.tar" in caplog.text


# ------------------------------------------------------------------------------------------------ validate / predict
def test_validate_and_predict_report_skips_and_prediction_files_record_them(tmp_path, tokenizer_dir):
    from pumer_lightning.tasks import NLVR2Task
    from pumer_lightning.tasks.base import BackboneSpec

    good = nlvr2_records("val0", 6)
    bad_label = record("val1-0-0", [{"text_id": "val1-0-0-0", "text": "a circle", "label": "maybe"}],
                       [image_bytes(), image_bytes()])  # fmt: skip
    no_image = record("val1-1-0", [{"text_id": f"val1-1-0-{j}", "text": "a circle", "label": True} for j in range(2)],
                      [image_bytes()])  # fmt: skip
    write_claimed(tmp_path / "val", [(good, 6, 6), ([bad_label, no_image], 2, 3)])
    out = tmp_path / "predictions"
    model = NLVR2Task(
        backbone=BackboneSpec(preset="vilt_tiny", tokenizer=str(tokenizer_dir)), predictions_dir=str(out)
    )

    def dm():
        return dm_for(tmp_path, tokenizer_dir, image_size=96)

    metrics = trainer().validate(model, datamodule=dm())[0]
    assert metrics["data/skipped/val/bad_label"] == 1 and metrics["data/skipped/val/missing_image"] == 2
    for stage, run in (("predict", trainer().predict), ("test", trainer().test)):
        run(model, datamodule=dm())
        csv = out / f"nlvr2_{stage}_predictions.csv"
        assert len(csv.read_text().splitlines()) == 6
        summary = json.loads((out / f"{csv.name}.skipped.json").read_text())
        assert summary == {"stage": stage, "split": "val", "predictions": 6, "skipped_total": 3,
                           "skipped": {"bad_label": 1, "missing_image": 2}}  # fmt: skip
