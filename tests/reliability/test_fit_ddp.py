"""Real 2-process DDP training on CPU (gloo, Lightning's ``ddp`` launcher) over an uneven shard count."""

from __future__ import annotations

import pytest
from reliability_helpers import run_script

pytestmark = pytest.mark.slow


def test_two_process_fit_matches_one_process_validation(shapes_snli, tmp_path):
    # 3 training shards over 2 ranks x 1 worker: uneven, yet both ranks must step the same number of times
    ddp = run_script("fit", shapes_snli, tmp_path / "ddp", "--devices", "2", "--max-epochs", "2")
    assert ddp["world_size"] == 2
    # 72 examples / 2 ranks / batch 8 = 4.5 -> 4 equal steps per rank and epoch, 2 epochs
    assert ddp["global_step"] == 8
    # validation: every one of the 54 examples scored exactly once over both ranks (3 shards: 24, 24, 6)
    assert ddp["val_samples"] == 54
    assert len(ddp["val_keys"]) == len(set(ddp["val_keys"])) == 54
    # checkpoints written once, by rank 0, under one name each; one log directory
    assert ddp["checkpoints"] == ["epoch0.ckpt", "epoch1.ckpt", "last.ckpt"]
    assert [p.name for p in (tmp_path / "ddp" / "fit").iterdir()] == ["version_0"]

    # the same weights validated by a single process give the same metric on the same data
    ckpt = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    single = run_script(
        "validate", shapes_snli, tmp_path / "single", "--devices", "1", "--ckpt-path", str(ckpt)
    )
    assert single["world_size"] == 1 and single["val_samples"] == 54
    assert sorted(single["val_keys"]) == sorted(ddp["val_keys"])
    assert single["metrics"]["val/acc"] == pytest.approx(ddp["metrics"]["val/acc"], abs=1e-6)
    assert single["val_prob_sum"] == pytest.approx(ddp["val_prob_sum"], rel=1e-5)
    # and a 2-process validate of the same checkpoint agrees too
    again = run_script(
        "validate", shapes_snli, tmp_path / "ddp_val", "--devices", "2", "--ckpt-path", str(ckpt)
    )
    assert again["metrics"]["val/acc"] == pytest.approx(single["metrics"]["val/acc"], abs=1e-6)
    assert again["val_prob_sum"] == pytest.approx(single["val_prob_sum"], rel=1e-5)
