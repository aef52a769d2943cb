"""Config, data-location and schedule errors stop at once, naming the file or field, before any training.

The reducer fields and checkpoint key lists are covered where they live (tests/reduce, tests/models); here the
data directory cases go through `VLDataModule.setup` (what Lightning calls before the first step) and extreme
schedules through a real forward.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pumer_lightning.data import VLDataModule
from pumer_lightning.models import build_backbone
from pumer_lightning.reduce import ReducerSchedule


def _setup(data_dir: Path, tokenizer: Path) -> VLDataModule:
    dm = VLDataModule(task="snli_ve", data_dir=data_dir, tokenizer=tokenizer, image_size=32, batch_size=4,
                      num_workers=0)  # fmt: skip
    dm.setup("fit")
    return dm


def _copy(shapes_snli, tmp_path) -> Path:
    return Path(shutil.copytree(shapes_snli[0], tmp_path / "snli_ve"))


def test_intact_copy_sets_up(shapes_snli, tmp_path):
    """The control for the cases below: the same copy, untouched, sets up and yields a batch."""
    dm = _setup(_copy(shapes_snli, tmp_path), shapes_snli[1])
    assert next(iter(dm.train_dataloader()))["labels"].shape == (4,)


def test_data_dir_that_does_not_exist(shapes_snli, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"data_dir {tmp_path / 'nowhere'} does not exist.*prepare"):
        _setup(tmp_path / "nowhere", shapes_snli[1])


def test_data_dir_without_splits(shapes_snli, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"split directory {tmp_path / 'train'} does not exist"):
        _setup(tmp_path, shapes_snli[1])


def test_split_with_shards_but_no_meta(shapes_snli, tmp_path):
    data_dir = _copy(shapes_snli, tmp_path)
    (data_dir / "train" / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"train/meta.json is missing: .* is not a converted split"):
        _setup(data_dir, shapes_snli[1])


def test_meta_listing_shards_missing_on_disk(shapes_snli, tmp_path, caplog):
    """Shared storage not mounted, or only meta.json copied: the missing shard files are named at setup; with
    some shards there the run goes on (the missing ones are shard_error skips), with none it stops."""
    data_dir = _copy(shapes_snli, tmp_path)
    tars = sorted((data_dir / "train").glob("*.tar"))
    assert len(tars) >= 2
    for tar in tars[1:]:
        tar.unlink()
    with caplog.at_level("WARNING", logger="pumer_lightning.data"):
        dm = _setup(data_dir, shapes_snli[1])
    assert f"missing on disk: {tars[1].name}" in caplog.text
    assert next(iter(dm.train_dataloader()))["labels"].shape == (4,)
    tars[0].unlink()
    with pytest.raises(FileNotFoundError, match=f"missing on disk: {tars[0].name}"):
        _setup(data_dir, shapes_snli[1])


def test_meta_listing_no_nonempty_shard(shapes_snli, tmp_path, caplog):
    """Shard entries are claims: entries that say 0 do not keep their shards from being read (a warning names
    them); a split whose meta.json says it holds no example at all cannot size an epoch and stops."""
    data_dir = _copy(shapes_snli, tmp_path)
    meta_path = data_dir / "train" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for shard in meta["shards"]:
        shard["records"] = shard["samples"] = 0
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="pumer_lightning.data"):
        batch = next(iter(_setup(data_dir, shapes_snli[1]).train_dataloader()))
    assert batch["labels"].shape == (4,) and "vs listed 0 / 0" in caplog.text
    meta["num_samples"] = 0
    meta_path.write_text(json.dumps(meta))
    dm = _setup(data_dir, shapes_snli[1])
    with pytest.raises(ValueError, match="train: meta.json lists no non-empty shard"):
        dm.train_dataloader()


@pytest.mark.parametrize("preset", ["vilt_tiny", "meter_tiny"])
def test_extreme_ratios_never_leave_fewer_than_one_token(preset):
    """keep_ratio near 0 and the largest merge ratios at every layer, on a text of [CLS] only: the counting
    rules keep the image CLS plus one token and the text CLS, and the forward stays finite."""
    model = build_backbone(preset).eval()
    model.reducer = ReducerSchedule(
        layers=list(range(model.num_layers)), keep_ratio=1e-6, merge_ratio=0.5, text_merge_ratio=0.5
    )
    size = model.image_size
    pixels = torch.randn(2, 3, size, size)
    for length in (1, 2, 5):
        ids = torch.full((2, length), 5)
        mask = torch.ones(2, length, dtype=torch.long)
        with torch.no_grad():
            out = model(pixels, ids, mask)
        assert out.image_states.shape[1] == 2, "image CLS + one token must survive"
        assert out.text_states.shape[1] >= 1 and (out.text_mask[:, 0] == 1).all()
        assert torch.isfinite(out.pooled).all()
        plan = model.reducer.plan(model.num_image_tokens, length)
        assert all(step.image_out >= 2 and step.text_out >= 1 for step in plan)
