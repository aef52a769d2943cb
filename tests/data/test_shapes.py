"""The shapes world: labels are true of the drawn scenes, generation is deterministic and fast."""

from __future__ import annotations

import json
import re
import resource
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from pumer_lightning.data import VLDataModule
from pumer_lightning.data.prepare.vqa2 import soft_scores
from pumer_lightning.data.schema import read_split_meta
from pumer_lightning.data.shapes import (
    NUMBER_WORDS,
    VQA_ANSWERS,
    ShapesSpec,
    World,
    ensure_shapes,
    generate,
    main,
    vocabulary,
)


def records(split_dir: Path):
    """(key, json payload) of every record of a split, read straight from the tar files."""
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    yield m.name[:-5], json.loads(tar.extractfile(m).read())


def objects(scene):
    return {(o["color"], o["shape"]): o for o in scene}


def holds(scene, rel, a, b):
    oa, ob = objects(scene)[a], objects(scene)[b]
    return {
        "left of": oa["col"] < ob["col"],
        "right of": oa["col"] > ob["col"],
        "above": oa["row"] < ob["row"],
        "below": oa["row"] > ob["row"],
    }[rel]


def has(scene, color=None, shape=None):
    return any((color in (None, o["color"])) and (shape in (None, o["shape"])) for o in scene)


def count(scene, color=None, shape=None):
    return sum((color in (None, o["color"])) and (shape in (None, o["shape"])) for o in scene)


REL = r"(left of|right of|above|below)"
OBJ = r"(\w+) (circle|square|triangle)"


def statement_truth(scene, text):
    """Truth of a single-image statement (SNLI-VE hypotheses), derived independently of the generator."""
    if m := re.fullmatch(rf"there is a {OBJ}", text):
        return has(scene, m[1], m[2])
    if m := re.fullmatch(r"there is a (circle|square|triangle)", text):
        return has(scene, shape=m[1])
    if m := re.fullmatch(r"there is a (\w+) shape", text):
        return has(scene, color=m[1])
    if m := re.fullmatch(r"there (?:is|are) exactly (\w+) (\w+) shapes?", text):
        return count(scene, color=m[2]) == NUMBER_WORDS.index(m[1])
    if m := re.fullmatch(rf"the {OBJ} is {REL} the {OBJ}", text):
        return holds(scene, m[3], (m[1], m[2]), (m[4], m[5]))
    raise AssertionError(f"unparsed statement {text!r}")


def nlvr2_truth(scenes, text):
    side = {"left": 0, "right": 1}
    if m := re.fullmatch(r"both images contain a " + OBJ, text):
        return all(has(s, m[1], m[2]) for s in scenes)
    if m := re.fullmatch(rf"in the (left|right) image the {OBJ} is {REL} the {OBJ}", text):
        return holds(scenes[side[m[1]]], m[4], (m[2], m[3]), (m[5], m[6]))
    m = re.fullmatch(r"the (left|right) image contains (.*)", text)
    assert m, text
    scene, rest = scenes[side[m[1]]], m[2]
    if c := re.fullmatch(r"exactly (\w+) (\w+) shapes?", rest):
        return count(scene, color=c[2]) == NUMBER_WORDS.index(c[1])
    return statement_truth(scene, "there is " + rest)


def test_every_label_is_true_of_its_scene(tiny_shapes):
    per_type = defaultdict(Counter)
    for split in ("train", "val", "test"):
        for _, info in records(tiny_shapes / "nlvr2" / split):
            (entry,) = info["texts"]
            assert nlvr2_truth(info["scenes"], entry["text"]) == entry["label"], entry
            per_type[entry["statement_type"]][entry["label"]] += 1
        for _, info in records(tiny_shapes / "snli_ve" / split):
            scene = info["scenes"][0]
            for e in info["texts"]:
                if e["label"] == "neutral":
                    m = re.fullmatch(rf"the {OBJ} is (\w+)", e["text"])
                    assert m and has(scene, m[1], m[2]) and e["statement_type"] == "neutral"
                else:
                    assert statement_truth(scene, e["text"]) == (e["label"] == "entailment"), e
        for _, info in records(tiny_shapes / "vqa2" / split):
            scene = info["scenes"][0]
            for e in info["texts"]:
                q, a = e["text"], e["answer"]
                if m := re.fullmatch(r"what shape is the (\w+) object \?", q):
                    assert count(scene, color=m[1]) == 1 and has(scene, m[1], a)
                elif m := re.fullmatch(r"what color is the (\w+) \?", q):
                    assert count(scene, shape=m[1]) == 1 and has(scene, a, m[1])
                elif m := re.fullmatch(r"how many (\w+) shapes are there \?", q):
                    assert int(a) == count(scene, color=m[1])
                elif m := re.fullmatch(r"how many (\w+)s are there \?", q):
                    assert int(a) == count(scene, shape=m[1])
                elif m := re.fullmatch(rf"is there a {OBJ} \?", q):
                    assert (a == "yes") == has(scene, m[1], m[2])
                else:
                    m = re.fullmatch(rf"is the {OBJ} {REL} the {OBJ} \?", q)
                    assert m and (a == "yes") == holds(scene, m[3], (m[1], m[2]), (m[4], m[5])), q
                assert len(e["answers"]) == 10 and e["label"] == soft_scores(e["answers"], set(VQA_ANSWERS))
        for _, info in records(tiny_shapes / "retrieval" / split):
            scene = info["scenes"][0]
            assert len(info["texts"]) <= 5 and isinstance(info["image_index"], int)
            for e in info["texts"]:
                for c, s in re.findall(OBJ, e["text"]):
                    assert has(scene, c, s), e
                if m := re.fullmatch(rf"a {OBJ} {REL} a {OBJ}", e["text"]):
                    assert holds(scene, m[3], (m[1], m[2]), (m[4], m[5]))
    # labels are balanced within every statement type (the warm-up types included)
    assert set(per_type) == {"shape", "color", "exist", "both", "count", "rel"}
    for stype, c in per_type.items():
        assert abs(c[True] - c[False]) <= 2, (stype, c)


def test_scenes_are_patch_aligned(tiny_shapes):
    meta = read_split_meta(tiny_shapes / "vqa2" / "val")
    world = meta.extra["spec"]["world"]
    grid = world["image_size"] // world["patch_size"]
    for _, info in records(tiny_shapes / "vqa2" / "val"):
        scene = info["scenes"][0]
        assert world["min_objects"] <= len(scene) <= world["max_objects"]
        cells = {(o["row"], o["col"]) for o in scene}
        assert len(cells) == len(scene) and all(0 <= r < grid and 0 <= c < grid for r, c in cells)
        assert len(objects(scene)) == len(scene)  # each (colour, shape) at most once


def test_tokenizer_covers_every_text(tiny_shapes):
    from pumer_lightning.data.collate import load_tokenizer

    tok = load_tokenizer(tiny_shapes / "tokenizer")
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(tok) == len(vocabulary())
    for task in ("nlvr2", "vqa2", "snli_ve", "retrieval"):
        for _, info in records(tiny_shapes / task / "train"):
            for e in info["texts"]:
                ids = tok(e["text"])["input_ids"]
                assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
                assert tok.unk_token_id not in ids, e["text"]


def test_generation_is_deterministic_and_independent_of_processes(tmp_path):
    spec = ShapesSpec(seed=11, num_train=13, num_val=4, num_test=0, tasks=("nlvr2", "vqa2"), shard_size=3,
                      world=World(image_size=32, patch_size=8))  # fmt: skip
    a = generate(spec, tmp_path / "a", workers=1, progress=False)
    b = generate(spec, tmp_path / "b", workers=2, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.tar"))
    assert len(files) == 5 + 2 + 2 + 1  # nlvr2 13 -> 5 shards of 3 records, vqa2 5 records -> 2 shards ...
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    spec.seed = 12
    c = generate(spec, tmp_path / "c", workers=1, progress=False)
    assert (c / files[0]).read_bytes() != (a / files[0]).read_bytes()
    assert read_split_meta(a / "vqa2" / "train").num_samples == 13
    assert not (a / "vqa2" / "test").exists()


def test_ensure_shapes_only_generates_when_missing(tmp_path):
    kw = dict(
        num_train=6, num_val=3, num_test=3, tasks=("snli_ve",), image_size=32, patch_size=8, progress=False
    )
    root = ensure_shapes(tmp_path / "s", **kw)
    shard = next((root / "snli_ve" / "train").glob("*.tar"))
    stamp = shard.stat().st_mtime_ns
    ensure_shapes(tmp_path / "s", **kw)
    assert shard.stat().st_mtime_ns == stamp  # untouched
    ensure_shapes(tmp_path / "s", **{**kw, "num_train": 9})
    assert read_split_meta(root / "snli_ve" / "train").num_samples == 9


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.mark.slow
def test_cli_generates_thousands_fast_and_the_datamodule_reads_them(tmp_path, capsys):
    out = tmp_path / "shapes"
    start, cpu = time.perf_counter(), _cpu_seconds()
    argv = ["--out", str(out), "--num-train", "2000", "--num-val", "500", "--num-test", "500", "--seed", "1",
            "--tasks", "nlvr2", "--image-size", "384", "--workers", "2"]  # fmt: skip
    assert main(argv) == 0
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    # CPU time, not wall time, is what a shared machine cannot distort: 40 CPU-s is 20 s on two free cores.
    assert cpu < 40, f"3000 NLVR2 examples (6000 images at 384 px) took {cpu:.1f} CPU-s ({elapsed:.1f}s wall)"
    assert "wrote 3000 examples" in capsys.readouterr().out
    assert main(argv) == 0 and "up to date" in capsys.readouterr().out
    dm = VLDataModule(task="nlvr2", data_dir=str(out / "nlvr2"), tokenizer=str(out / "tokenizer"),
                      batch_size=16, eval_batch_size=100, num_workers=0)  # fmt: skip
    assert dm.num_train_samples == 2000 and dm.steps_per_epoch() == 125
    keys = set()
    for batch in dm.val_dataloader():
        assert batch["pixel_values"].shape[1:] == (2, 3, 384, 384)
        keys.update(batch["keys"])
        types = {m["statement_type"] for m in batch["meta"]}
        assert types <= {"shape", "color", "exist", "both", "count", "rel"}
    assert len(keys) == 500


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--image-size", "100", "--patch-size", "32"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--tasks", "nlvr2,captioning"])


def test_statement_types_can_be_restricted(tmp_path):
    spec = ShapesSpec(seed=0, num_train=24, num_val=0, num_test=0, tasks=("nlvr2", "snli_ve"), types=("shape", "color"),
                      world=World(image_size=32, patch_size=8))  # fmt: skip
    root = generate(spec, tmp_path / "s", workers=1, progress=False)
    assert read_split_meta(root / "nlvr2" / "train").extra["statement_types"] == {"shape": 12, "color": 12}
    assert set(read_split_meta(root / "snli_ve" / "train").extra["statement_types"]) == {
        "shape",
        "color",
        "neutral",
    }
    with pytest.raises(ValueError, match="no statement type"):
        ShapesSpec(tasks=("vqa2",), types=("both",)).task_types("vqa2")
