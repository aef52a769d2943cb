"""Texts about scenes: NLVR2 statements about image pairs, VQA questions, SNLI-VE hypotheses, captions."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from ..prepare.vqa2 import soft_scores
from .world import (
    COLORS,
    NUMBER_WORDS,
    PROPERTIES,
    RELATIONS,
    SHAPES,
    VQA_ANSWERS,
    Obj,
    Pattern,
    World,
    matches,
    sample_scene,
)


def _count(scene: list[Obj], pattern: Pattern) -> int:
    return sum(matches(o.color, o.shape, pattern) for o in scene)


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
