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

Modules: :mod:`.world` (vocabulary, tokenizer, scenes, rendering), :mod:`.texts` (the texts of each task) and
:mod:`.generate` (records, shards, ``meta.json``, :func:`ensure_shapes`, the command line); their public names are
importable from here.
"""

from __future__ import annotations

from .generate import ShapesSpec, ensure_shapes, generate, is_current, main, make_record
from .texts import nlvr2_record, retrieval_record, snli_ve_record, vqa_record
from .world import (
    COLORS,
    NUMBER_WORDS,
    PROPERTIES,
    RELATIONS,
    SHAPES,
    SPECIAL_TOKENS,
    SPLITS,
    STATEMENT_TYPES,
    TEXTS_PER_RECORD,
    VQA_ANSWERS,
    Obj,
    World,
    encode_image,
    render,
    sample_scene,
    save_tokenizer,
    vocabulary,
)

__all__ = [
    "COLORS",
    "NUMBER_WORDS",
    "PROPERTIES",
    "RELATIONS",
    "SHAPES",
    "SPECIAL_TOKENS",
    "SPLITS",
    "STATEMENT_TYPES",
    "TEXTS_PER_RECORD",
    "VQA_ANSWERS",
    "Obj",
    "ShapesSpec",
    "World",
    "encode_image",
    "ensure_shapes",
    "generate",
    "is_current",
    "main",
    "make_record",
    "nlvr2_record",
    "render",
    "retrieval_record",
    "sample_scene",
    "save_tokenizer",
    "snli_ve_record",
    "vocabulary",
    "vqa_record",
]
