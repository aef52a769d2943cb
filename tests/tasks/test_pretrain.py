"""Pre-training (ITM + MLM over captions): BERT's masking rule, real ITM mismatches, a loss that falls, and an
export that any task fine-tunes from (backbone only, strict, architecture-checked)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Trainer
from pumer_test_utils import BASE, EXPERIMENTS

from pumer_lightning.cli import PumerCLI
from pumer_lightning.data import VLDataModule
from pumer_lightning.models.checkpoint import CheckpointError
from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.tasks import BackboneSpec, NLVR2Task, OptimConfig, PretrainTask, VQATask
from pumer_lightning.tasks.pretrain import (
    ALL_OBJECTS,
    IGNORE,
    OBJECT_BITS,
    draw_negatives,
    mask_tokens,
    named_objects,
    scene_objects,
)

PRETRAIN = EXPERIMENTS / "shapes_pretrain.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose 10-100x to them when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- masking
def _texts(n: int, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[CLS] w ... w [SEP] [PAD] ...`` with 2..length-2 words (ids 5..49), CLS 2, SEP 3, PAD 0."""
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    words = torch.randint(2, length - 1, (n,), generator=g)
    for i, w in enumerate(words.tolist()):
        ids[i, 0], ids[i, 1 : w + 1], ids[i, w + 1] = 2, torch.randint(5, 50, (w,), generator=g), 3
        mask[i, : w + 2] = 1
    return ids, mask


SPECIAL = torch.tensor([0, 1, 2, 3, 4])
REPLACE = torch.arange(5, 50)


def test_masking_never_touches_pads_or_special_tokens():
    ids, mask = _texts(4000)
    ids[::7, 3] = 1  # some [UNK] inside real text: special, never chosen
    masked, labels = mask_tokens(
        ids,
        mask,
        mask_id=4,
        special_ids=SPECIAL,
        replace_ids=REPLACE,
        prob=0.5,
        generator=torch.Generator().manual_seed(0),
    )
    chosen = labels != IGNORE
    assert chosen.any()
    assert not (chosen & (mask == 0)).any(), "a pad was chosen"
    assert not (chosen & torch.isin(ids, SPECIAL)).any(), "a special token was chosen"
    assert torch.equal(masked[~chosen], ids[~chosen])  # nothing else changes
    assert torch.equal(labels[chosen], ids[chosen])  # labels hold the originals
    replaced = chosen & (masked != 4) & (masked != ids)
    assert torch.isin(masked[replaced], REPLACE).all()  # random words are ordinary words


def test_masking_follows_bert_15_and_80_10_10_on_a_large_sample():
    ids, mask = _texts(40000)
    masked, labels = mask_tokens(
        ids,
        mask,
        mask_id=4,
        special_ids=SPECIAL,
        replace_ids=REPLACE,
        generator=torch.Generator().manual_seed(0),
    )
    candidates = (mask == 1) & ~torch.isin(ids, SPECIAL)
    n_cand = int(candidates.sum())
    chosen = labels != IGNORE
    n = int(chosen.sum())
    rate = n / n_cand
    assert abs(rate - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n_cand)
    as_mask = int((masked[chosen] == 4).sum()) / n
    unchanged = int((masked[chosen] == ids[chosen]).sum()) / n
    random = 1 - as_mask - unchanged
    p_same = 1 / len(REPLACE)  # a random word can draw the original
    for observed, expected in ((as_mask, 0.8), (random, 0.1 * (1 - p_same)), (unchanged, 0.1 + 0.1 * p_same)):
        assert abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / n), (observed, expected)


# ---------------------------------------------------------------------------------------------- ITM negatives
def test_named_and_scene_objects():
    red_circle, blue_square = OBJECT_BITS[("red", "circle")], OBJECT_BITS[("blue", "square")]
    assert named_objects("a picture showing a red circle , a blue square and a cyan triangle") == (
        red_circle | blue_square | OBJECT_BITS[("cyan", "triangle")]
    )
    assert named_objects("two shapes with a red circle") == red_circle
    assert named_objects("a dog on a sofa") == 0
    scene = {"scenes": [[{"color": "red", "shape": "circle", "row": 0, "col": 0}]]}
    assert scene_objects(scene) == red_circle
    assert scene_objects({}) == ALL_OBJECTS  # unknown: no caption counts as naming a missing object


def test_draw_negatives_prefers_captions_naming_a_missing_object_and_falls_back_to_other_images():
    g = torch.Generator().manual_seed(0)
    red, blue = OBJECT_BITS[("red", "circle")], OBJECT_BITS[("blue", "square")]
    images = torch.tensor([0, 1, 2])
    named = torch.tensor([red, red, blue])  # captions 0, 1 name the red circle, 2 the blue square
    scenes = torch.tensor([red, red, ALL_OBJECTS])  # image 2: scene unknown
    for _ in range(50):
        neg = draw_negatives(images, images, scenes, named, g)
        assert neg[0] == 2 and neg[1] == 2  # the only caption naming an object images 0 and 1 lack
        assert neg[2] in (0, 1)  # unknown scene: any caption of another image
    with pytest.raises(ValueError, match="single image"):
        draw_negatives(torch.tensor([5, 5]), torch.tensor([5, 5]))


def _retrieval_data(shapes, batch_size=32):
    dm = VLDataModule(
        "retrieval",
        str(shapes / "retrieval"),
        str(shapes / "tokenizer"),
        image_size=96,
        batch_size=batch_size,
        eval_batch_size=8,
        num_workers=0,
        max_text_len=16,
    )
    dm.setup("fit")
    return dm


def _task(shapes, **kwargs) -> PretrainTask:
    spec = BackboneSpec("vilt_tiny", tokenizer=str(shapes / "tokenizer"))
    return PretrainTask(backbone=spec, optim=OptimConfig(lr=2e-3, lr_mult_head=1.0), **kwargs)


def test_training_itm_negatives_are_real_mismatches(shapes):
    dm = _retrieval_data(shapes)
    batch = dm.normalize_batch(next(iter(dm.train_dataloader())))
    task = _task(shapes)
    pairs = task.training_pairs(batch)
    n = batch["input_ids"].shape[0]
    labels = pairs["itm_labels"]
    assert int((labels == 0).sum()) == n // 2  # exactly half swapped
    text_of = {tuple(r.tolist()): m["text"] for r, m in zip(batch["input_ids"], batch["meta"])}
    for row in range(n):
        ids = pairs["itm_input_ids"][row]
        if labels[row] == 1:
            assert torch.equal(ids, batch["input_ids"][row])
            continue
        text = text_of[tuple(ids.tolist())]  # a caption of the batch
        scene = {(o["color"], o["shape"]) for o in batch["meta"][row]["scenes"][0]}
        named = {k for k, bit in OBJECT_BITS.items() if named_objects(text) & bit}
        assert named - scene, (
            f"negative {text!r} describes scene {scene}"
        )  # so it is no caption of this image
    # MLM rows: each caption with its own image, masked
    assert torch.equal(pairs["mlm_rows"], torch.arange(n)) and (pairs["mlm_labels"] != IGNORE).any()


def test_rejects_text_merging_and_other_data(shapes, tmp_path):
    with pytest.raises(ValueError, match="text_merge_ratio must be 0"):
        _task(shapes, reducer=ReducerSchedule(layers=[1], keep_ratio=0.7, text_merge_ratio=0.2))
    _task(shapes, reducer=ReducerSchedule(layers=[1], keep_ratio=0.7))  # image pruning alone is allowed
    with pytest.raises(ValueError, match="--data.task=retrieval"):
        PumerCLI(
            args=["fit", *_cli_args(shapes, tmp_path, "--data.task=nlvr2", f"--data.data_dir={shapes}/nlvr2")]
        )


# ---------------------------------------------------------------------------------------------- fit and export
def _cli_args(shapes, out, *extra):
    return [
        "-c",
        str(BASE),
        "-c",
        str(PRETRAIN),
        f"--data_root={out}",
        "--shapes=null",
        "--model.backbone.preset=vilt_tiny",
        f"--model.backbone.tokenizer={shapes / 'tokenizer'}",
        f"--data.data_dir={shapes / 'retrieval'}",
        "--data.batch_size=16",
        "--data.eval_batch_size=8",
        "--data.num_workers=0",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]


def test_loss_falls_in_a_few_steps(shapes):
    task = _task(shapes)
    dm = _retrieval_data(shapes, batch_size=16)
    trainer = Trainer(
        max_steps=40,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[],
    )
    before = trainer.validate(task, dm, verbose=False)[0]
    trainer.fit(task, dm)
    after = trainer.validate(task, dm, verbose=False)[0]
    assert after["val/loss"] < before["val/loss"] - 0.5, (before, after)
    assert after["val/loss_mlm"] < before["val/loss_mlm"]
    for key in ("val/itm_acc", "val/mlm_acc"):
        assert 0.0 <= after[key] <= 1.0
    # validation pairs every caption of the split with its image and with one negative: the same each time
    assert trainer.validate(task, dm, verbose=False)[0] == after


@pytest.fixture(scope="module")
def exported(shapes, tmp_path_factory):
    """The ordinary CLI fits the pre-training experiment (tiny) and exports its backbone."""
    out = tmp_path_factory.mktemp("pretrain")
    cli = PumerCLI(args=["fit", *_cli_args(shapes, out, "--trainer.max_epochs=1")])
    return cli, out / "shapes" / "pretrained" / "shapes_pretrain"


def test_fit_exports_the_backbone_with_its_figures(exported):
    cli, path = exported
    assert cli.model.exported == path
    config = json.loads((path / "pumer_config.json").read_text())
    assert config["preset"] == "vilt_tiny" and config["task"] is None  # backbone only, no head
    info = config["pretraining"]
    assert info["objectives"] == "itm+mlm" and info["steps"] == 6  # 96 captions / 16
    assert 0 <= info["itm_acc"] <= 1 and 0 <= info["mlm_acc"] <= 1
    assert (
        "val/itm_acc" in cli.trainer.callback_metrics
    )  # the task's main metric (TaskCheckpoint monitors it)


@pytest.mark.parametrize("cls", [VQATask, NLVR2Task])
def test_export_starts_a_fine_tune_of_another_task(exported, shapes, cls):
    cli, path = exported
    pre = cli.model.backbone.state_dict()
    spec = BackboneSpec("vilt_tiny", checkpoint=str(path), tokenizer=str(shapes / "tokenizer"))
    kwargs = {"num_answers": 18} if cls is VQATask else {}
    torch.manual_seed(7)
    task = cls(backbone=spec, **kwargs)
    for name, value in task.backbone.state_dict().items():
        if name == "embeddings.token_type_embeddings.weight" and cls is NLVR2Task:
            assert torch.equal(value[:2], pre[name]) and torch.equal(
                value[2], pre[name][1]
            )  # row 2 from row 1
        else:
            assert torch.equal(value, pre[name]), name
    torch.manual_seed(7)
    again = cls(backbone=spec, **kwargs)
    torch.manual_seed(8)
    other = cls(backbone=spec, **kwargs)
    heads = [dict(m.head.state_dict()) for m in (task, again, other)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # the seed initialises the new head
    assert not all(torch.equal(heads[0][k], heads[2][k]) for k in heads[0])


def test_export_of_another_architecture_is_refused(exported, shapes, tmp_path):
    _, path = exported
    copy = tmp_path / "edited"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "pumer_config.json").read_text())
    config["architecture"]["hidden_act"] = "relu"  # same shapes, other computation
    (copy / "pumer_config.json").write_text(json.dumps(config))
    spec = BackboneSpec("vilt_tiny", checkpoint=str(copy), tokenizer=str(shapes / "tokenizer"))
    with pytest.raises(CheckpointError, match="hidden_act"):
        VQATask(backbone=spec, num_answers=18)
