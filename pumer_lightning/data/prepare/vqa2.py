"""VQAv2: questions + annotations json and COCO images -> shards, with the answer vocabulary and soft scores.

Source layout (the files as downloaded from visualqa.org, and COCO image folders)::

    <src>/v2_OpenEnded_mscoco_{train2014,val2014,test2015,test-dev2015}_questions.json
    <src>/v2_mscoco_{train2014,val2014}_annotations.json
    <src>/{train2014,val2014,test2015}/COCO_<split>_<id:012d>.jpg      (or --images DIR holding those folders)

The json files may also sit in ``<src>/questions`` / ``<src>/annotations``. Output splits: train (train2014),
val (val2014), test (test2015, unlabelled) and test-dev (test-dev2015, unlabelled).

Answer vocabulary (as PuMer builds it): normalise ``multiple_choice_answer`` of every labelled question of
train+val, keep answers given for at least ``--min-count`` (9) distinct questions, sort alphabetically (3129
answers on the full data). Soft targets: count the ten raw annotator answers per question and score an answer
0.3, 0.6, 0.9 or 1.0 for 1, 2, 3 or >= 4 occurrences; answers outside the vocabulary are dropped.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..writer import RecordPlan
from .common import PreparedSplit, find_dir, find_file, open_text

# ------------------------------------------------------------------------------------------------ normalisation
_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# Apostrophe-less spellings annotators type, mapped to the usual form.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "id": "i'd", "ill": "i'll", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "lets": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "oclock": "o'clock", "shant": "shan't", "shed": "she'd",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "somethings": "something's", "thats": "that's", "thered": "there'd",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip


def normalize_answer(answer: str) -> str:
    """Normalise a VQA answer the way the VQA evaluation and bottom-up vocabularies do.

    Punctuation is removed (glued to neighbours when it touches a space or a number like ``1,000``, otherwise
    replaced by a space), lone periods dropped, number words mapped to digits, articles dropped and
    apostrophe-less contractions restored; finally commas are removed.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    glue = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        if glue or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _LONE_PERIOD.sub("", out)
    words = []
    for word in out.lower().split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words).replace(",", "")


_SCORES = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}


def answer_score(count: int) -> float:
    """Soft score of an answer given by ``count`` of the ten annotators (the VQA accuracy of that answer)."""
    return _SCORES.get(count, 1.0)


def soft_scores(raw_answers: Iterable[str], vocab: set[str] | dict[str, int]) -> dict[str, float]:
    """``{answer: score}`` over the raw annotator answers that are in ``vocab``."""
    counts = Counter(raw_answers)
    return {a: answer_score(n) for a, n in sorted(counts.items()) if a in vocab}


def build_vocabulary(mc_answers: Iterable[str], min_count: int = 9) -> list[str]:
    """Answers (normalised) given as ``multiple_choice_answer`` for >= ``min_count`` questions, sorted."""
    counts = Counter(normalize_answer(a) for a in mc_answers)
    return sorted(a for a, n in counts.items() if n >= min_count and a)


# ------------------------------------------------------------------------------------------------ converter
SPLITS = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}
IMAGE_FOLDER = {
    "train2014": "train2014",
    "val2014": "val2014",
    "test2015": "test2015",
    "test-dev2015": "test2015",
}
JSON_DIRS = (".", "questions", "annotations", "Questions", "Annotations")


def _questions_file(src: Path, official: str, required: bool) -> Path | None:
    return find_file(src, f"v2_OpenEnded_mscoco_{official}_questions.json", JSON_DIRS, required=required)


def _annotations_file(src: Path, official: str) -> Path | None:
    return find_file(src, f"v2_mscoco_{official}_annotations.json", JSON_DIRS, required=False)


def _load(path: Path, field: str) -> list[dict[str, Any]]:
    try:
        with open_text(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if field not in data:
        raise ValueError(f"{path}: has no '{field}' field")
    return data[field]


def prepare(
    src: Path,
    splits: list[str] | None,
    images: Path | None,
    seed: int,
    min_count: int = 9,
) -> list[PreparedSplit]:
    """Plan every requested split; the vocabulary comes from the labelled train/val questions present."""
    explicit = splits is not None
    splits = _requested_splits(src, splits)
    annotations, mc_answers, vocab_sources = _load_annotations(src, splits if explicit else None)
    vocab = build_vocabulary(mc_answers, min_count)
    vocab_set = set(vocab)
    image_root = images or src
    out = []
    for split in splits:
        official = SPLITS[split]
        qpath = _questions_file(src, official, required=True)
        assert qpath is not None
        img_dir = find_dir(image_root, IMAGE_FOLDER[official], (".", "images"))
        anns = annotations.get(split)
        by_image, skipped = _questions_by_image(qpath, anns, vocab_set)
        folder = IMAGE_FOLDER[official]
        plans = []
        for image_id in sorted(by_image):
            key = f"COCO_{folder}_{image_id:012d}"
            info = {"image_id": key, "coco_id": image_id, "texts": by_image[image_id]}
            plans.append(RecordPlan(key, info, [img_dir / f"{key}.jpg"]))
        if split == "train":
            random.Random(seed).shuffle(plans)
        out.append(
            PreparedSplit(
                split=split,
                plans=plans,
                labeled=anns is not None,
                labels=vocab,
                extra={"source": official, "vocab_from": vocab_sources, "min_count": min_count},
                skipped=skipped,
            )
        )
    return out


def _requested_splits(src: Path, splits: list[str] | None) -> list[str]:
    """``splits`` checked against VQAv2's, or every split whose question file is in ``src``."""
    splits = splits or [s for s in SPLITS if _questions_file(src, SPLITS[s], required=False) is not None]
    if not splits:
        expected = ", ".join(f"v2_OpenEnded_mscoco_{o}_questions.json" for o in SPLITS.values())
        raise FileNotFoundError(f"no VQAv2 question file in {src} (looked for {expected})")
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"--splits: unknown VQAv2 split {s!r} (choose from {', '.join(SPLITS)})")
    return splits


def _load_annotations(
    src: Path, required: list[str] | None
) -> tuple[dict[str, dict[int, dict[str, Any]]], list[str], list[str]]:
    """The train/val annotations present, by split and question id, with the multiple-choice answers the
    vocabulary is built from and the files they came from; a split in ``required`` must have its file."""
    annotations: dict[str, dict[int, dict[str, Any]]] = {}
    mc_answers: list[str] = []
    vocab_sources = []
    for s in ("train", "val"):
        path = _annotations_file(src, SPLITS[s])
        if path is None:
            if required is not None and s in required:
                raise FileNotFoundError(
                    f"{src}: v2_mscoco_{SPLITS[s]}_annotations.json is missing for split {s}"
                )
            continue
        anns = {a["question_id"]: a for a in _load(path, "annotations")}
        annotations[s] = anns
        mc_answers += [a["multiple_choice_answer"] for a in anns.values()]
        vocab_sources.append(path.name)
    if not mc_answers:
        raise FileNotFoundError(
            f"{src}: no VQAv2 annotation file (v2_mscoco_train2014_annotations.json or "
            "v2_mscoco_val2014_annotations.json); the answer vocabulary is built from them"
        )
    return annotations, mc_answers, vocab_sources


def _questions_by_image(
    qpath: Path, anns: dict[int, dict[str, Any]] | None, vocab_set: set[str]
) -> tuple[dict[int, list[dict[str, Any]]], dict[str, list[str]]]:
    """The questions of ``qpath`` grouped by COCO image id, labelled from ``anns`` when the split has them;
    questions without an annotation are skipped (and listed by reason)."""
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    skipped: dict[str, list[str]] = {}
    for q in _load(qpath, "questions"):
        entry: dict[str, Any] = {
            "text_id": str(q["question_id"]),
            "question_id": int(q["question_id"]),
            "text": q["question"],
        }
        if anns is not None:
            ann = anns.get(q["question_id"])
            if ann is None:
                skipped.setdefault("no_annotation", []).append(f"question {q['question_id']} ({qpath.name})")
                continue
            raw = [a["answer"] for a in ann["answers"]]
            entry.update(
                answers=raw,
                label=soft_scores(raw, vocab_set),
                multiple_choice_answer=ann.get("multiple_choice_answer"),
                answer_type=ann.get("answer_type"),
                question_type=ann.get("question_type"),
            )
        by_image[int(q["image_id"])].append(entry)
    return by_image, skipped
