"""The shapes world: synthetic scenes of coloured shapes for the four PuMer tasks, written in the real schema.

Scenes are drawn on a grid of ``image_size / patch_size`` cells per side, so with ViLT's 32 px patches at 384 px
the grid is 12 x 12 and every object covers whole patch tokens (an object spans ``object_cells`` x
``object_cells`` cells). Backgrounds are textured grey (a smooth blotch field plus mild pixel noise), objects
are circles, squares or triangles in six jittered colours, 3 to 6 of them, never overlapping, each
(colour, shape) pair at most once per scene so that "the red circle" always names one object.

Texts per task (``statement_type`` is stored with every text so studies can report accuracy per type):

- ``nlvr2``: one statement about an image pair, true or false, labels exactly balanced per type. Types:
  ``shape`` and ``color`` (single attribute: the warm-up types a small model learns first), ``exist``
  (colour + shape, false cases are hard negatives whose colour and shape both occur), ``both``, ``count``
  and ``rel`` (spatial relation; hard, see docs/study.md#what-a-synthetic-task-can-show).
- ``vqa2``: three questions per image (``shape``/``color`` of a unique object, ``exist`` yes/no, ``count``,
  ``rel`` yes/no), ten simulated annotator answers each, soft scores computed as for VQAv2.
- ``snli_ve``: three hypotheses per image, one per label: a true statement (entailment), a false statement
  of the same type (contradiction), and an unverifiable property of a present object (neutral).
- ``retrieval``: five captions per image naming some of its objects.

Everything derives from ``seed``: record ``i`` of a (task, split) uses its own random generator, so the data
do not depend on the number of processes or on the shard size. A word-level tokenizer covering the whole
vocabulary is saved to ``<out>/tokenizer`` in the transformers format.

CLI: ``python -m pumer_lightning.data.shapes --out data/shapes --num-train 2000 --num-val 500 --num-test 500``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .prepare.vqa2 import soft_scores
from .schema import (
    NLVR2_LABELS,
    SNLI_VE_LABELS,
    TASKS,
    ShardInfo,
    SplitMeta,
    shard_name,
    write_json_atomic,
    write_split_meta,
)
from .writer import encode_record, write_shard

log = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 210, 40),
    "magenta": (205, 50, 200),
    "cyan": (40, 200, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
RELATIONS: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
PROPERTIES: tuple[str, ...] = ("heavy", "light", "new", "old", "wooden", "metal", "hollow", "warm", "cold")
SPLITS: tuple[str, ...] = ("train", "val", "test")

STATEMENT_TYPES: dict[str, tuple[str, ...]] = {
    "nlvr2": ("shape", "color", "exist", "both", "count", "rel"),
    "vqa2": ("shape", "color", "exist", "count", "rel"),
    "snli_ve": ("shape", "color", "exist", "count", "rel"),
    "retrieval": ("caption",),
}
TEXTS_PER_RECORD: dict[str, int] = {"nlvr2": 1, "vqa2": 3, "snli_ve": 3, "retrieval": 5}
VQA_ANSWERS: list[str] = sorted(["no", "yes", *map(str, range(7)), *COLORS, *SHAPES])

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDS = """
the a an is are there in of and with left right image images contains contain both exactly shape shapes
above below what color how many object objects scene picture showing it yes no not one two three four
five six zero only
""".split()


def vocabulary() -> list[str]:
    """Every token the shapes texts use, specials first (ids 0-4: PAD, UNK, CLS, SEP, MASK)."""
    words = set(_WORDS) | set(COLORS) | set(SHAPES) | {f"{s}s" for s in SHAPES} | set(PROPERTIES)
    words |= set(NUMBER_WORDS) | {str(i) for i in range(10)} | {"?", ",", "."}
    return [*SPECIAL_TOKENS, *sorted(words)]


def save_tokenizer(out_dir: str | Path, model_max_length: int = 64) -> Path:
    """Save a word-level tokenizer (lower-casing, whitespace/punctuation split, ``[CLS] ... [SEP]``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


# ---------------------------------------------------------------------------------------------- scenes
@dataclass
class Obj:
    color: str
    shape: str
    row: int  # top-left grid cell of the object
    col: int

    def name(self) -> str:
        return f"{self.color} {self.shape}"


Pattern = tuple[str | None, str | None]  # (colour or None, shape or None)


def _matches(color: str, shape: str, pattern: Pattern) -> bool:
    return (pattern[0] is None or pattern[0] == color) and (pattern[1] is None or pattern[1] == shape)


@dataclass
class World:
    """Grid geometry and object counts of a generated dataset."""

    image_size: int = 384
    patch_size: int = 32
    object_cells: int = 1
    min_objects: int = 3
    max_objects: int = 6
    noise: float = 8.0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"--image-size {self.image_size} is not a multiple of --patch-size {self.patch_size}"
            )
        if self.grid % self.object_cells:
            raise ValueError(f"--object-cells {self.object_cells} does not divide the {self.grid}-cell grid")
        slots = (self.grid // self.object_cells) ** 2
        if not 1 <= self.min_objects <= self.max_objects <= min(slots, len(COLORS) * len(SHAPES)):
            raise ValueError(
                f"need 1 <= --min-objects <= --max-objects <= {min(slots, len(COLORS) * len(SHAPES))}, "
                f"got {self.min_objects}, {self.max_objects}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def sample_scene(
    rng: random.Random,
    world: World,
    must_have: list[Pattern] = (),  # type: ignore[assignment]
    must_not: list[Pattern] = (),  # type: ignore[assignment]
    n: int | None = None,
    fill_must_not: list[Pattern] = (),  # type: ignore[assignment]
) -> list[Obj]:
    """Random scene: one object per ``must_have`` pattern, nothing matching ``must_not``, and the random
    remainder (up to ``n`` objects) also avoiding ``fill_must_not``."""
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    allowed = [p for p in all_pairs if not any(_matches(*p, q) for q in must_not)]
    n = n if n is not None else rng.randint(world.min_objects, world.max_objects)
    n = max(n, len(must_have))
    chosen: list[tuple[str, str]] = []
    for pattern in must_have:
        options = [p for p in allowed if _matches(*p, pattern) and p not in chosen]
        if not options:
            raise ValueError(f"cannot place {pattern} with forbidden {must_not}")
        chosen.append(rng.choice(options))
    rest = [p for p in allowed if p not in chosen and not any(_matches(*p, q) for q in fill_must_not)]
    rng.shuffle(rest)
    chosen += rest[: max(0, n - len(chosen))]
    rng.shuffle(chosen)
    blocks = world.grid // world.object_cells
    cells = rng.sample(range(blocks * blocks), len(chosen))
    k = world.object_cells
    return [Obj(c, s, (cell // blocks) * k, (cell % blocks) * k) for (c, s), cell in zip(chosen, cells)]


_NOISE_BANK: dict[tuple[int, float], np.ndarray] = {}


def _noise_bank(size: int, std: float) -> np.ndarray:
    """A fixed (seeded) field of pixel noise, twice the image side; images take random crops of it."""
    key = (size, std)
    if key not in _NOISE_BANK:
        bank = np.random.default_rng(12345).normal(0.0, std, size=(2 * size, 2 * size))
        _NOISE_BANK[key] = bank.astype(np.float32)
    return _NOISE_BANK[key]


def render(scene: list[Obj], world: World, rng: np.random.Generator) -> Image.Image:
    """Draw a scene on a textured grey background; each object fills its cell block with a small margin."""
    s, g = world.image_size, world.grid
    field = rng.normal(rng.uniform(95, 165), 14.0, size=(g + 1, g + 1)).astype(np.float32)
    grey = np.asarray(Image.fromarray(field, "F").resize((s, s), Image.Resampling.BILINEAR))
    if world.noise > 0:
        y, x = rng.integers(0, s, size=2)
        grey = grey + _noise_bank(s, world.noise)[y : y + s, x : x + s]
    img = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")
    draw = ImageDraw.Draw(img)
    cell = world.patch_size
    jitter = rng.integers(-20, 21, size=(len(scene), 3))
    for obj, jit in zip(scene, jitter):
        size = cell * world.object_cells
        x0, y0 = obj.col * cell, obj.row * cell
        margin = max(1, round(size * 0.1))
        box = (x0 + margin, y0 + margin, x0 + size - margin - 1, y0 + size - margin - 1)
        color = tuple(int(min(255, max(0, v + d))) for v, d in zip(COLORS[obj.color], jit))
        if obj.shape == "circle":
            draw.ellipse(box, fill=color)
        elif obj.shape == "square":
            inset = max(0, round(size * 0.05))
            draw.rectangle((box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset), fill=color)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=color)
    return img


def encode_image(img: Image.Image, fmt: str) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, "JPEG", quality=92)
    else:
        img.save(buf, "PNG", compress_level=1)
    return fmt, buf.getvalue()


def _scene_json(scene: list[Obj]) -> list[dict[str, Any]]:
    return [{"color": o.color, "shape": o.shape, "row": o.row, "col": o.col} for o in scene]


def _count(scene: list[Obj], pattern: Pattern) -> int:
    return sum(_matches(o.color, o.shape, pattern) for o in scene)


def _number(n: int) -> str:
    return NUMBER_WORDS[n]


def _plural(shape: str | None, n: int) -> str:
    noun = shape or "shape"
    return noun if n == 1 else f"{noun}s"


def _relation(a: Obj, b: Obj, rng: random.Random) -> str:
    """A relation that holds between ``a`` and ``b`` (they always differ in row or column)."""
    options = []
    if a.col != b.col:
        options.append("left of" if a.col < b.col else "right of")
    if a.row != b.row:
        options.append("above" if a.row < b.row else "below")
    return rng.choice(options)


# ---------------------------------------------------------------------------------------------- NLVR2
def nlvr2_record(rng: random.Random, world: World, stype: str, label: bool) -> tuple[list, dict[str, Any]]:
    """Two scenes and one statement of type ``stype`` whose truth is ``label``."""
    side = rng.randrange(2)
    side_word = ("left", "right")[side]
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    other = sample_scene(rng, world)
    if stype == "shape":
        scene = sample_scene(rng, world, [(None, shape)] if label else [], [] if label else [(None, shape)])
        text = f"the {side_word} image contains a {shape}"
    elif stype == "color":
        scene = sample_scene(rng, world, [(color, None)] if label else [], [] if label else [(color, None)])
        text = f"the {side_word} image contains a {color} shape"
    elif stype == "exist":
        if label:
            scene = sample_scene(rng, world, [(color, shape)])
        else:  # hard negative: the colour and the shape both occur, never together
            other_shape = rng.choice([s for s in SHAPES if s != shape])
            other_color = rng.choice([c for c in COLORS if c != color])
            scene = sample_scene(rng, world, [(color, other_shape), (other_color, shape)], [(color, shape)])
        text = f"the {side_word} image contains a {color} {shape}"
    elif stype == "both":
        scene = sample_scene(rng, world, [(color, shape)])
        other = sample_scene(rng, world, [(color, shape)] if label else [], [] if label else [(color, shape)])
        text = f"both images contain a {color} {shape}"
    elif stype == "count":
        n = rng.randint(1, 3)
        actual = n if label else rng.choice([k for k in range(4) if k != n])
        scene = sample_scene(rng, world, [(color, None)] * actual, fill_must_not=[(color, None)])
        text = f"the {side_word} image contains exactly {_number(n)} {color} {_plural(None, n)}"
    elif stype == "rel":
        scene = sample_scene(rng, world, n=max(2, rng.randint(world.min_objects, world.max_objects)))
        a, stated, b = _rel_parts(rng, scene, label)  # type: ignore[misc]
        text = f"in the {side_word} image the {a.name()} is {stated} the {b.name()}"
    else:
        raise ValueError(f"unknown NLVR2 statement type {stype!r}")
    scenes = [scene, other] if side == 0 else [other, scene]
    if stype == "both" and rng.random() < 0.5:
        scenes.reverse()
    return scenes, {"text": text, "label": bool(label), "statement_type": stype}


# ---------------------------------------------------------------------------------------------- single-image texts
def _exist_pair(rng: random.Random, scene: list[Obj], truth: bool) -> tuple[str, str]:
    """A (colour, shape) present in the scene, or absent from it (a hard negative when there is one)."""
    present = {(o.color, o.shape) for o in scene}
    if truth:
        return rng.choice(sorted(present))
    colors, shapes = {o.color for o in scene}, {o.shape for o in scene}
    hard = sorted((c, s) for c in colors for s in shapes if (c, s) not in present)
    return rng.choice(hard or sorted((c, s) for c in COLORS for s in SHAPES if (c, s) not in present))


def _rel_parts(rng: random.Random, scene: list[Obj], truth: bool) -> tuple[Obj, str, Obj] | None:
    if len(scene) < 2:
        return None
    a, b = rng.sample(scene, 2)
    rel = _relation(a, b, rng)
    return a, (rel if truth else RELATIONS[rel]), b


def _true_or_false_statement(
    rng: random.Random, scene: list[Obj], stype: str, truth: bool
) -> tuple[str, str] | None:
    """A statement about ``scene`` of type ``stype`` with the given truth value (None if impossible)."""
    colors = {o.color for o in scene}
    shapes = {o.shape for o in scene}
    if stype == "shape":
        pool = sorted(shapes) if truth else [s for s in SHAPES if s not in shapes]
        return (f"there is a {rng.choice(pool)}", stype) if pool else None
    if stype == "color":
        pool = sorted(colors) if truth else [c for c in COLORS if c not in colors]
        return (f"there is a {rng.choice(pool)} shape", stype) if pool else None
    if stype == "exist":
        c, s = _exist_pair(rng, scene, truth)
        return f"there is a {c} {s}", stype
    if stype == "count":
        color = rng.choice(sorted(colors))
        actual = _count(scene, (color, None))
        n = actual if truth else rng.choice([k for k in range(1, 4) if k != actual])
        verb = "is" if n == 1 else "are"
        return f"there {verb} exactly {_number(n)} {color} {_plural(None, n)}", stype
    if stype == "rel":
        parts = _rel_parts(rng, scene, truth)
        if parts is None:
            return None
        a, rel, b = parts
        return f"the {a.name()} is {rel} the {b.name()}", stype
    raise ValueError(f"unknown statement type {stype!r}")


def _vqa_question(rng: random.Random, scene: list[Obj], stype: str, yes: bool) -> tuple[str, str, str] | None:
    """(question, answer, type) or None when the scene cannot support the type."""
    colors = Counter(o.color for o in scene)
    shapes = Counter(o.shape for o in scene)
    if stype == "shape":
        unique = sorted(c for c, n in colors.items() if n == 1)
        if not unique:
            return None
        color = rng.choice(unique)
        return f"what shape is the {color} object ?", next(o.shape for o in scene if o.color == color), stype
    if stype == "color":
        unique = sorted(s for s, n in shapes.items() if n == 1)
        if not unique:
            return None
        shape = rng.choice(unique)
        return f"what color is the {shape} ?", next(o.color for o in scene if o.shape == shape), stype
    if stype == "exist":
        c, s = _exist_pair(rng, scene, yes)
        return f"is there a {c} {s} ?", "yes" if yes else "no", stype
    if stype == "count":
        if rng.random() < 0.5:
            color = rng.choice(list(COLORS))
            return f"how many {color} shapes are there ?", str(_count(scene, (color, None))), stype
        shape = rng.choice(SHAPES)
        return f"how many {shape}s are there ?", str(_count(scene, (None, shape))), stype
    if stype == "rel":
        parts = _rel_parts(rng, scene, yes)
        if parts is None:
            return None
        a, rel, b = parts
        return f"is the {a.name()} {rel} the {b.name()} ?", "yes" if yes else "no", stype
    raise ValueError(f"unknown VQA question type {stype!r}")


def _answer_pool(answer: str) -> list[str]:
    if answer in ("yes", "no"):
        return ["yes", "no"]
    if answer in COLORS:
        return list(COLORS)
    if answer in SHAPES:
        return list(SHAPES)
    return [str(i) for i in range(7)]


def vqa_record(rng: random.Random, world: World, types: tuple[str, ...], first: int, n: int):
    """One scene with ``n`` questions; types cycle over ``types``, yes/no answers alternate."""
    for _ in range(100):
        scene = sample_scene(rng, world)
        entries = []
        for j in range(n):
            index = first + j
            yes = (index // len(types)) % 2 == 0
            wanted = types[index % len(types)]
            # A scene without a unique colour cannot support "what shape is the red object?": ask the next
            # allowed type instead, and draw a new scene if none fits.
            order = [wanted] + [t for t in types if t != wanted]
            q = next((q for t in order if (q := _vqa_question(rng, scene, t, yes)) is not None), None)
            if q is None:
                break
            question, answer, qtype = q
            # Ten annotators: mostly the right answer, sometimes a plausible wrong one, as in VQAv2.
            raw = [answer if rng.random() < 0.85 else rng.choice(_answer_pool(answer)) for _ in range(10)]
            entries.append(
                {
                    "text": question,
                    "answers": raw,
                    "label": soft_scores(raw, set(VQA_ANSWERS)),
                    "answer": answer,
                    "statement_type": qtype,
                }
            )
        else:
            return [scene], entries
    raise RuntimeError(f"no scene supports the VQA question types {types}")


def snli_ve_record(rng: random.Random, world: World, types: tuple[str, ...], first: int):
    """One scene with three hypotheses: a true and a false statement of one type, and a neutral one."""
    stype = types[first % len(types)]
    for _ in range(100):
        scene = sample_scene(rng, world)
        true = _true_or_false_statement(rng, scene, stype, True)
        false = _true_or_false_statement(rng, scene, stype, False)
        if true is not None and false is not None:  # e.g. "there is no triangle" needs a scene without one
            break
    else:
        raise RuntimeError(f"no scene supports SNLI-VE statements of type {stype!r}")
    o = rng.choice(scene)
    entries = [
        {"text": true[0], "label": "entailment", "statement_type": stype},
        {
            "text": f"the {o.name()} is {rng.choice(PROPERTIES)}",
            "label": "neutral",
            "statement_type": "neutral",
        },
        {"text": false[0], "label": "contradiction", "statement_type": stype},
    ]
    rng.shuffle(entries)
    return [scene], entries


def retrieval_record(rng: random.Random, world: World, n: int):
    scene = sample_scene(rng, world)
    entries = []
    for _ in range(n):
        k = rng.randint(1, min(3, len(scene)))
        objs = rng.sample(scene, k)
        names = [f"a {o.name()}" for o in objs]
        form = rng.randrange(3)
        if k >= 2 and form == 0:
            a, b = objs[0], objs[1]
            text = f"a {a.name()} {_relation(a, b, rng)} a {b.name()}"
        elif form == 1:
            listed = names[0] if k == 1 else " , ".join(names[:-1]) + f" and {names[-1]}"
            text = f"a picture showing {listed}"
        else:
            listed = names[0] if k == 1 else " , ".join(names[:-1]) + f" and {names[-1]}"
            text = f"{_number(len(scene))} shapes with {listed}"
        entries.append({"text": text, "statement_type": "caption"})
    return [scene], entries


# ---------------------------------------------------------------------------------------------- generation
@dataclass
class ShapesSpec:
    """Everything that determines a generated shapes dataset (stored in ``<out>/shapes.json``)."""

    seed: int = 0
    num_train: int = 2000
    num_val: int = 500
    num_test: int = 500
    tasks: tuple[str, ...] = TASKS
    world: World = field(default_factory=World)
    types: tuple[str, ...] | None = None  # restrict statement types (None: all of each task's types)
    image_format: str = "jpg"
    shard_size: int = 250  # records per shard

    def num(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]

    def task_types(self, task: str) -> tuple[str, ...]:
        own = STATEMENT_TYPES[task]
        if self.types is None or task == "retrieval":
            return own
        chosen = tuple(t for t in own if t in self.types)
        if not chosen:
            raise ValueError(f"--types {','.join(self.types)} leaves no statement type for {task} ({own})")
        return chosen

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        out["types"] = list(self.types) if self.types is not None else None
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShapesSpec:
        obj = dict(obj)
        obj["world"] = World(**obj["world"])
        obj["tasks"] = tuple(obj["tasks"])
        obj["types"] = tuple(obj["types"]) if obj.get("types") is not None else None
        return cls(**obj)

    def task_json(self, task: str) -> dict[str, Any]:
        """The part of the spec that determines one task's data."""
        out = self.to_json()
        out.pop("tasks")
        out["task"] = task
        return out


def _record_rng(seed: int, task: str, split: str, index: int) -> tuple[random.Random, np.random.Generator]:
    ints = [seed, TASKS.index(task), SPLITS.index(split), index]
    return random.Random(f"shapes/{ints}"), np.random.default_rng(ints)


def make_record(spec: ShapesSpec, task: str, split: str, index: int, first_text: int, n_texts: int):
    """Record ``index`` of a split: (key, json payload, images) — deterministic from the spec."""
    rng, nprng = _record_rng(spec.seed, task, split, index)
    world = spec.world
    types = spec.task_types(task)
    key = f"shapes-{split}-{index:07d}"
    if task == "nlvr2":
        stype = types[index % len(types)]
        label = (index // len(types)) % 2 == 0
        scenes, entry = nlvr2_record(rng, world, stype, label)
        entries = [entry]
    elif task == "vqa2":
        scenes, entries = vqa_record(rng, world, types, first_text, n_texts)
    elif task == "snli_ve":
        scenes, entries = snli_ve_record(rng, world, types, index)
        entries = entries[:n_texts]
    else:
        scenes, entries = retrieval_record(rng, world, n_texts)
    for j, entry in enumerate(entries):
        entry["text_id"] = f"{key}-{j}"
        if task == "vqa2":
            entry["question_id"] = (SPLITS.index(split) + 1) * 10**8 + first_text + j
    info: dict[str, Any] = {"image_id": key, "texts": entries, "scenes": [_scene_json(s) for s in scenes]}
    if task == "retrieval":
        info["image_index"] = index
    images = [encode_image(render(s, world, nprng), spec.image_format) for s in scenes]
    return key, info, images


def _plan(spec: ShapesSpec, task: str, split: str) -> list[tuple[int, int, int]]:
    """(record index, first text index, number of texts) for every record of a split."""
    total, per = spec.num(split), TEXTS_PER_RECORD[task]
    return [(i, first, min(per, total - first)) for i, first in enumerate(range(0, total, per))]


def _write_shard_job(
    job: tuple[ShapesSpec, str, str, int, list[tuple[int, int, int]], str],
) -> dict[str, Any]:
    spec, task, split, shard_index, records, out_dir = job
    types: Counter = Counter()
    labels: Counter = Counter()
    n_samples = 0

    def samples():
        nonlocal n_samples
        for index, first, n in records:
            key, info, images = make_record(spec, task, split, index, first, n)
            for e in info["texts"]:
                types[e["statement_type"]] += 1
                if "label" in e and not isinstance(e["label"], dict):
                    labels[str(e["label"])] += 1
            n_samples += len(info["texts"])
            yield encode_record(key, info, images)

    name = shard_name(task, split, shard_index)
    n = write_shard(Path(out_dir) / name, samples())
    return {"name": name, "records": n, "samples": n_samples, "types": types, "labels": labels}


def _labels_for(task: str) -> list[str] | None:
    return {"nlvr2": list(NLVR2_LABELS), "snli_ve": list(SNLI_VE_LABELS), "vqa2": VQA_ANSWERS}.get(task)


def generate(spec: ShapesSpec, out: str | Path, workers: int | None = None, progress: bool = True) -> Path:
    """Generate every requested task and split of ``spec`` under ``out`` (overwriting), plus the tokenizer."""
    out = Path(out)
    for task in spec.tasks:
        if task not in TASKS:
            raise ValueError(f"--tasks: unknown task {task!r} (choose from {', '.join(TASKS)})")
        spec.task_types(task)
    workers = workers or min(os.cpu_count() or 1, 8)
    out.mkdir(parents=True, exist_ok=True)
    jobs, dirs = [], {}
    for task in spec.tasks:
        for split in SPLITS:
            if spec.num(split) <= 0:
                continue
            final = out / task / split
            tmp = out / task / f".{split}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            dirs[(task, split)] = (tmp, final)
            plan = _plan(spec, task, split)
            for k in range(0, len(plan), spec.shard_size):
                jobs.append(
                    (spec, task, split, k // spec.shard_size, plan[k : k + spec.shard_size], str(tmp))
                )
    results: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in dirs}
    total = sum(len(j[4]) for j in jobs)
    bar = tqdm(total=total, desc="shapes", unit="rec", disable=not progress)
    start = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            workers
        ) as pool:
            for job, res in zip(jobs, pool.imap(_write_shard_job, jobs)):
                results[(job[1], job[2])].append(res)
                bar.update(len(job[4]))
    else:
        for job in jobs:
            results[(job[1], job[2])].append(_write_shard_job(job))
            bar.update(len(job[4]))
    bar.close()
    for (task, split), shard_results in results.items():
        tmp, final = dirs[(task, split)]
        shard_results.sort(key=lambda r: r["name"])
        types: Counter = Counter()
        labels: Counter = Counter()
        for r in shard_results:
            types.update(r["types"])
            labels.update(r["labels"])
        meta = SplitMeta.from_shards(
            task=task,
            split=split,
            dataset=f"shapes-{task}",
            shards=[ShardInfo(r["name"], r["records"], r["samples"]) for r in shard_results],
            labeled=task != "retrieval",
            labels=_labels_for(task),
            created_by="pumer_lightning.data.shapes",
            extra={
                "spec": spec.task_json(task),
                "statement_types": dict(types),
                "label_counts": dict(labels),
            },
        )
        write_split_meta(tmp, meta)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    save_tokenizer(out / "tokenizer")
    write_json_atomic(out / "shapes.json", spec.to_json())
    log.info("shapes: %d records in %.1fs -> %s", total, time.perf_counter() - start, out)
    return out


def ensure_shapes(
    root: str | Path = "data/shapes",
    *,
    num_train: int = 2000,
    num_val: int = 500,
    num_test: int = 500,
    seed: int = 0,
    tasks: tuple[str, ...] | list[str] = TASKS,
    image_size: int = 384,
    patch_size: int = 32,
    object_cells: int = 1,
    types: tuple[str, ...] | list[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate the shapes world under ``root`` unless the same data are already there; returns ``root``.

    "The same" means ``<root>/shapes.json`` records an identical specification, every requested task has its
    three ``meta.json`` files and the tokenizer exists. Otherwise everything is regenerated.
    """
    spec = ShapesSpec(
        seed=seed,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        tasks=tuple(tasks),
        world=World(image_size=image_size, patch_size=patch_size, object_cells=object_cells),
        types=tuple(types) if types is not None else None,
    )
    root = Path(root)
    if is_current(root, spec):
        return root
    return generate(spec, root, workers=workers, progress=progress)


def is_current(root: str | Path, spec: ShapesSpec) -> bool:
    """Whether ``root`` already holds the data ``spec`` describes."""
    root = Path(root)
    try:
        stored = json.loads((root / "shapes.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if stored != spec.to_json() or not (root / "tokenizer" / "tokenizer.json").is_file():
        return False
    return all(
        (root / task / split / "meta.json").is_file()
        for task in spec.tasks
        for split in SPLITS
        if spec.num(split)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pumer_lightning.data.shapes",
        description="Generate the synthetic shapes world (all four tasks, real shard schema) and its tokenizer.",
    )
    p.add_argument("--out", default="data/shapes", help="output root (default: data/shapes)")
    p.add_argument("--num-train", type=int, default=2000, help="training examples (texts) per task")
    p.add_argument("--num-val", type=int, default=500, help="validation examples per task")
    p.add_argument("--num-test", type=int, default=500, help="test examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--patch-size", type=int, default=32, help="grid cell = ViT patch (32 for ViLT-B/32)")
    p.add_argument("--object-cells", type=int, default=1, help="object side in grid cells")
    p.add_argument("--min-objects", type=int, default=3)
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--noise", type=float, default=8.0, help="std of the background pixel noise")
    p.add_argument("--types", default=None, help="restrict statement types, e.g. shape,color,exist")
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--shard-size", type=int, default=250, help="records per shard")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    p.add_argument("--force", action="store_true", help="regenerate even if the same data exist")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        spec = ShapesSpec(
            seed=args.seed,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
            tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
            world=World(
                image_size=args.image_size,
                patch_size=args.patch_size,
                object_cells=args.object_cells,
                min_objects=args.min_objects,
                max_objects=args.max_objects,
                noise=args.noise,
            ),
            types=tuple(t.strip() for t in args.types.split(",")) if args.types else None,
            image_format=args.image_format,
            shard_size=args.shard_size,
        )
        for task in spec.tasks:
            if task not in TASKS:
                raise ValueError(f"--tasks: unknown task {task!r} (choose from {', '.join(TASKS)})")
            spec.task_types(task)
        if min(spec.num_train, spec.num_val, spec.num_test) < 0 or spec.shard_size < 1:
            raise ValueError("--num-* must be >= 0 and --shard-size >= 1")
    except ValueError as exc:
        p.error(str(exc))
    if not args.force and is_current(args.out, spec):
        print(f"{args.out}: up to date (use --force to regenerate)")
        return 0
    start = time.perf_counter()
    generate(spec, args.out, workers=args.workers)
    elapsed = time.perf_counter() - start
    n = sum(spec.num(s) for s in SPLITS) * len(spec.tasks)
    print(f"wrote {n} examples ({', '.join(spec.tasks)}) to {args.out} in {elapsed:.1f}s")
    print(f"tokenizer: {Path(args.out) / 'tokenizer'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
