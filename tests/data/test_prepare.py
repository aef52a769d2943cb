"""Converters: tiny source trees in each official format -> shards -> the DataModule reads them back."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from pumer_lightning.data import VLDataModule
from pumer_lightning.data.prepare import convert, main
from pumer_lightning.data.prepare.vqa2 import answer_score, build_vocabulary, normalize_answer, soft_scores
from pumer_lightning.data.schema import read_split_meta


def save_image(path: Path, color, size=(40, 30), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def read_all(dm: VLDataModule, split: str) -> dict[str, tuple]:
    """key -> (text, label, pixels, meta) over one exact pass."""
    out = {}
    for b in dm.eval_dataloader(split, images_only=False):
        for i, k in enumerate(b["keys"]):
            label = b["labels"][i] if "labels" in b else None
            out[k] = (b["meta"][i]["text"], label, b["pixel_values"][i], b["meta"][i])
    return out


def dm_for(out: Path, task: str, tokenizer_dir: Path) -> VLDataModule:
    return VLDataModule(task=task, data_dir=str(out), tokenizer=str(tokenizer_dir), image_size=16,
                        eval_batch_size=4, num_workers=0)  # fmt: skip


# ------------------------------------------------------------------------------------------------ NLVR2
@pytest.fixture
def nlvr2_src(tmp_path) -> Path:
    src = tmp_path / "nlvr2_src"
    rows = {
        "train": [
            {
                "identifier": "train-1-0-0",
                "sentence": "One image has a dog.",
                "label": "True",
                "synset": "dog",
            },
            {"identifier": "train-1-0-1", "sentence": "Both images have cats.", "label": "False"},
            {"identifier": "train-2-1-0", "sentence": "There are two birds.", "label": "False"},
            {"identifier": "train-3-0-0", "sentence": "Images missing on disk.", "label": "True"},
            {"identifier": "train-4-0-0", "sentence": "A bad label.", "label": "Maybe"},
        ],
        "dev": [
            {"identifier": f"dev-{i}-0-0", "sentence": f"dev sentence {i}", "label": ["False", "True"][i % 2]}
            for i in range(5)
        ],
        "test1": [{"identifier": "test1-0-0-0", "sentence": "a test sentence", "label": "True"}],
    }
    for split, split_rows in rows.items():
        write_jsonl(src / f"{split}.json", split_rows)
    # train images live in numbered subfolders, as in the official download
    for i, pair in enumerate(["train-1-0", "train-2-1", "train-4-0"]):
        save_image(src / "images" / "train" / str(i) / f"{pair}-img0.png", (200, 10 * i, 0))
        save_image(src / "images" / "train" / str(i) / f"{pair}-img1.png", (0, 10 * i, 200))
    for i in range(5):
        save_image(src / "dev" / f"dev-{i}-0-img0.png", (250, 0, 0))
        save_image(src / "dev" / f"dev-{i}-0-img1.png", (0, 0, 250), fmt="JPEG")
    save_image(src / "test1" / "test1-0-0-img0.png", (1, 2, 3))
    save_image(src / "test1" / "test1-0-0-img1.png", (3, 2, 1))
    return src


def test_nlvr2_round_trip(nlvr2_src, tmp_path, tokenizer_dir, capsys):
    out = tmp_path / "nlvr2"
    assert (
        main(["nlvr2", "--src", str(nlvr2_src), "--out", str(out), "--shard-size", "2", "--no-progress"]) == 0
    )
    report = capsys.readouterr().out
    assert "skipped 2 (missing_image)" in report and "train-3-0-img0" in report
    assert "skipped 1 (bad_label)" in report and "train-4-0-0" in report
    meta = read_split_meta(out / "train")
    assert (meta.num_records, meta.num_samples, meta.num_images, len(meta.shards)) == (2, 3, 4, 1)
    assert read_split_meta(out / "val").num_samples == 5 and len(read_split_meta(out / "val").shards) == 3
    dm = dm_for(out, "nlvr2", tokenizer_dir)
    train = read_all(dm, "train")
    assert set(train) == {"train-1-0-0", "train-1-0-1", "train-2-1-0"}
    assert train["train-1-0-0"][0] == "One image has a dog." and train["train-1-0-0"][1].item() == 1
    assert train["train-1-0-1"][1].item() == 0 and train["train-1-0-0"][3]["synset"] == "dog"
    assert train["train-1-0-1"][3]["record_key"] == "train-1-0"
    pixels = train["train-2-1-0"][2]  # (2, 3, H, W): left is red, right is blue
    assert pixels[0, 0].mean() > 0.5 and pixels[0, 2].mean() < -0.5
    assert pixels[1, 2].mean() > 0.5 and pixels[1, 0].mean() < -0.5
    val = read_all(dm, "val")
    assert [val[f"dev-{i}-0-0"][1].item() for i in range(5)] == [0, 1, 0, 1, 0]
    assert val["dev-3-0-0"][0] == "dev sentence 3"
    assert set(read_all(dm, "test")) == {"test1-0-0-0"}


def test_converters_are_idempotent_and_resume(nlvr2_src, tmp_path):
    out = tmp_path / "nlvr2"
    first = convert("nlvr2", nlvr2_src, out, shard_size=2, progress=False)
    val_shards = sorted((out / "val").glob("*.tar"))
    stamps = {p: p.stat().st_mtime_ns for p in val_shards}
    meta_before = (out / "val" / "meta.json").read_text()
    again = convert("nlvr2", nlvr2_src, out, shard_size=2, progress=False)
    assert [s.shards_written for s in again] == [0, 0, 0]
    assert [s.shards_reused for s in again] == [s.shards_written for s in first]
    assert all(p.stat().st_mtime_ns == stamps[p] for p in val_shards)
    assert (out / "val" / "meta.json").read_text() == meta_before
    assert again[0].skipped == first[0].skipped  # the summary still reports earlier skips
    # an interrupted run: one shard lost -> only that shard is written again
    val_shards[1].unlink()
    resumed = convert("nlvr2", nlvr2_src, out, shard_size=2, splits=["val"], progress=False)
    assert (resumed[0].shards_written, resumed[0].shards_reused) == (1, 2)
    # changed annotations -> only the affected shard changes
    rows = [json.loads(line) for line in (nlvr2_src / "dev.json").read_text().splitlines()]
    rows[4]["sentence"] = "an edited sentence"
    write_jsonl(nlvr2_src / "dev.json", rows)
    edited = convert("nlvr2", nlvr2_src, out, shard_size=2, splits=["val"], progress=False)
    assert (edited[0].shards_written, edited[0].shards_reused) == (1, 2)
    assert not list((out / "val").glob(".*tmp"))


def test_missing_sources_are_named(tmp_path, nlvr2_src, capsys):
    assert main(["nlvr2", "--src", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="test1.json"):
        convert("nlvr2", tmp_path, tmp_path / "o", splits=["test"], progress=False)
    (nlvr2_src / "test1").rename(nlvr2_src / "elsewhere")
    with pytest.raises(FileNotFoundError, match="test1"):
        convert("nlvr2", nlvr2_src, tmp_path / "o", splits=["test"], progress=False)
    with pytest.raises(FileNotFoundError, match="v2_OpenEnded_mscoco"):
        convert("vqa2", tmp_path, tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        convert("coco", tmp_path, tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="snli_ve_train.jsonl"):
        convert("snli_ve", tmp_path, tmp_path / "o", progress=False)


# ------------------------------------------------------------------------------------------------ VQAv2
def test_answer_normalisation_and_scores():
    cases = {"Yes!": "yes", "Two": "2", "1,000": "1000", "a  cat.": "cat", "dont": "don't",
             "red-white": "red white", "The Ten dogs": "10 dogs", "3.5": "3.5", "none": "0"}  # fmt: skip
    for raw, want in cases.items():
        assert normalize_answer(raw) == want, raw
    assert [answer_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert build_vocabulary(["Yes", "yes", "no", "Two", "2", "cat"], min_count=2) == ["2", "yes"]
    assert soft_scores(["red"] * 4 + ["Red"] * 3 + ["blue"] * 2 + ["pink"], {"red", "pink"}) == {
        "pink": 0.3,
        "red": 1.0,
    }


def _answers(*pairs):
    out = []
    for answer, n in pairs:
        out += [{"answer": answer, "answer_confidence": "yes", "answer_id": len(out) + 1} for _ in range(n)]
    assert len(out) == 10
    return out


@pytest.fixture
def vqa_src(tmp_path) -> Path:
    src = tmp_path / "vqa_src"
    qs = {
        "train2014": [(1, 101, "What color is it?"), (1, 102, "How many?"), (2, 103, "Is it wet?")],
        "val2014": [(7, 701, "What color is the bus?"), (8, 801, "Any dogs?")],
        "test2015": [(9, 901, "What is this?"), (10, 1001, "Why?")],
        "test-dev2015": [(9, 901, "What is this?")],
    }
    anns = {
        101: ("red", _answers(("red", 4), ("Red", 3), ("blue", 3)), "other"),
        102: ("Two", _answers(("2", 3), ("two", 7)), "number"),
        103: ("yes", _answers(("yes", 2), ("no", 8)), "yes/no"),
        701: ("red.", _answers(("red", 10)), "other"),
        801: ("Yes!", _answers(("yes", 9), ("2", 1)), "yes/no"),
    }
    for split, rows in qs.items():
        questions = [{"image_id": i, "question": q, "question_id": qid} for i, qid, q in rows]
        (src / "questions").mkdir(parents=True, exist_ok=True)
        (src / "questions" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(
            json.dumps({"questions": questions, "data_subtype": split})
        )
        if split in ("train2014", "val2014"):
            annotations = [
                {"question_id": qid, "image_id": i, "answers": anns[qid][1], "multiple_choice_answer": anns[qid][0],
                 "answer_type": anns[qid][2], "question_type": "what"}
                for i, qid, _ in rows
            ]  # fmt: skip
            (src / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))
        folder = "test2015" if split.startswith("test") else split
        for i, _, _ in rows:
            save_image(src / folder / f"COCO_{folder}_{i:012d}.jpg", (20 * i, 100, 50), fmt="JPEG")
    return src


def test_vqa2_round_trip(vqa_src, tmp_path, tokenizer_dir):
    out = tmp_path / "vqa2"
    summaries = convert("vqa2", vqa_src, out, min_count=2, progress=False)
    assert [s.split for s in summaries] == ["train", "val", "test", "test-dev"]
    meta = read_split_meta(out / "train")
    # multiple_choice_answer normalised: red, 2, yes, red, yes -> kept if given for >= 2 questions
    assert meta.labels == ["red", "yes"] and read_split_meta(out / "test").labels == ["red", "yes"]
    assert (meta.num_records, meta.num_samples) == (2, 3)
    assert not read_split_meta(out / "test").labeled
    dm = dm_for(out, "vqa2", tokenizer_dir)
    assert dm.num_answers == 2
    train = read_all(dm, "train")
    assert train["101"][0] == "What color is it?"
    assert torch.allclose(train["101"][1], torch.tensor([1.0, 0.0]))  # "Red" (raw) is not "red"; blue OOV
    assert torch.allclose(train["102"][1], torch.tensor([0.0, 0.0]))  # no in-vocabulary answer: all zero
    assert torch.allclose(train["103"][1], torch.tensor([0.0, 0.6]))
    m = train["102"][3]
    assert (
        m["question_id"] == 102
        and m["answer_type"] == "number"
        and m["image_id"] == "COCO_train2014_000000000001"
    )
    assert m["record_key"] == train["101"][3]["record_key"]  # one record per image, two questions
    val = read_all(dm, "val")
    assert torch.allclose(val["801"][1], torch.tensor([0.0, 1.0]))
    test = read_all(dm, "test")
    assert set(test) == {"901", "1001"} and all(v[1] is None for v in test.values())
    assert set(read_all(dm, "test-dev")) == {"901"}


# ------------------------------------------------------------------------------------------------ SNLI-VE
def test_snli_ve_round_trip(tmp_path, tokenizer_dir, capsys):
    src = tmp_path / "snli_src"
    labels = ["entailment", "neutral", "contradiction", "-"]
    rows = [
        {"pairID": f"p{i}", "Flickr30K_ID": str(1000 + i % 2), "sentence1": "premise", "sentence2": f"hypothesis {i}",
         "gold_label": labels[i % 4]}
        for i in range(6)
    ] + [{"pairID": "lost", "Flickr30K_ID": "999", "sentence1": "x", "sentence2": "no image", "gold_label": "neutral"}]  # fmt: skip
    write_jsonl(src / "snli_ve_dev.jsonl", rows)
    write_jsonl(src / "snli_ve_train.jsonl", rows[:2])
    save_image(src / "flickr30k_images" / "1000.jpg", (255, 255, 255), fmt="JPEG")
    save_image(src / "flickr30k_images" / "1001.jpg", (0, 0, 0), fmt="JPEG")
    assert main(["snli_ve", "--src", str(src), "--out", str(tmp_path / "ve"), "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "skipped 1 (bad_label)" in report and "skipped 1 (missing_image)" in report and "999.jpg" in report
    dm = dm_for(tmp_path / "ve", "snli_ve", tokenizer_dir)
    val = read_all(dm, "val")
    assert set(val) == {"p0", "p1", "p2", "p4", "p5"}
    assert {k: v[1].item() for k, v in val.items()} == {"p0": 2, "p1": 1, "p2": 0, "p4": 2, "p5": 1}
    assert val["p2"][0] == "hypothesis 2" and val["p2"][3]["premise"] == "premise"
    assert val["p0"][2].mean() > 0.9 and val["p1"][2].mean() < -0.9  # image 1000 white, 1001 black
    assert Counter(v[3]["record_key"] for v in val.values()) == {"1000": 3, "1001": 2}


# ------------------------------------------------------------------------------------------------ retrieval
def _karpathy(images):
    out, sentid = [], 0
    for imgid, (filename, split, captions, extra) in enumerate(images):
        sentences = []
        for c in captions:
            sentences.append({"raw": c, "tokens": c.lower().split(), "sentid": sentid, "imgid": imgid})
            sentid += 1
        out.append({"filename": filename, "imgid": imgid, "split": split, "sentences": sentences,
                    "sentids": [s["sentid"] for s in sentences], **extra})  # fmt: skip
    return {"images": out}


@pytest.mark.parametrize("dataset", ["flickr30k", "coco"])
def test_retrieval_round_trip(dataset, tmp_path, tokenizer_dir):
    src = tmp_path / f"{dataset}_src"
    images = []
    for i in range(6):
        split = ["train", "train", "val", "test", "test", "restval" if dataset == "coco" else "val"][i]
        name = f"{1000 + i}.jpg" if dataset == "flickr30k" else f"COCO_val2014_{i:012d}.jpg"
        extra = {} if dataset == "flickr30k" else {"filepath": "val2014", "cocoid": i}
        images.append((name, split, [f"caption {i} {j}" for j in range(5 if i != 4 else 3)], extra))
        folder = src / ("flickr30k-images" if dataset == "flickr30k" else "val2014")
        save_image(folder / name, (40 * i, 0, 0), fmt="JPEG")
    src.mkdir(exist_ok=True)
    name = "dataset_flickr30k.json" if dataset == "flickr30k" else "dataset_coco.json"
    (src / name).write_text(json.dumps(_karpathy(images)))
    out = tmp_path / dataset
    summaries = convert(dataset, src, out, progress=False)
    want_splits = ["test", "train", "val"] + (["restval"] if dataset == "coco" else [])
    assert sorted(s.split for s in summaries) == sorted(want_splits)
    dm = VLDataModule(task="retrieval", data_dir=str(out), tokenizer=str(tokenizer_dir), image_size=16,
                      batch_size=4, num_workers=0)  # fmt: skip
    assert dm.num_train_samples == 10 and dm.num_labels == 0
    batch = next(iter(dm.train_dataloader()))
    for t, image_id in zip(batch["meta"], batch["image_ids"].tolist()):
        assert t["text"].startswith(f"caption {image_id} ")  # each caption stays with its image
    texts = dm.retrieval_texts("test")
    assert texts.texts == [f"caption 3 {j}" for j in range(5)] + [f"caption 4 {j}" for j in range(3)]
    assert texts.image_ids.tolist() == [3] * 5 + [4] * 3 and texts.all_image_ids.tolist() == [3, 4]
    assert texts.text_ids == [str(s) for s in range(15, 23)]
    images_seen = [int(i) for b in dm.eval_dataloader("test") for i in b["image_ids"]]
    assert sorted(images_seen) == [3, 4]
    if dataset == "coco":
        assert read_split_meta(out / "restval").num_samples == 5
