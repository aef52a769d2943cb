"""The world: vocabulary and tokenizer, scene geometry, sampling scenes and rendering them."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

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


def matches(color: str, shape: str, pattern: Pattern) -> bool:
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

    @classmethod
    def of(cls, settings: object) -> World:
        """The world described by any settings object carrying this class's fields (the shapes flags, the demo's
        `shapes` section)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

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
    allowed = [p for p in all_pairs if not any(matches(*p, q) for q in must_not)]
    n = n if n is not None else rng.randint(world.min_objects, world.max_objects)
    n = max(n, len(must_have))
    chosen: list[tuple[str, str]] = []
    for pattern in must_have:
        options = [p for p in allowed if matches(*p, pattern) and p not in chosen]
        if not options:
            raise ValueError(f"cannot place {pattern} with forbidden {must_not}")
        chosen.append(rng.choice(options))
    rest = [p for p in allowed if p not in chosen and not any(matches(*p, q) for q in fill_must_not)]
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


def scene_json(scene: list[Obj]) -> list[dict[str, Any]]:
    return [{"color": o.color, "shape": o.shape, "row": o.row, "col": o.col} for o in scene]
