"""What the bench measures: the experiments (backbone x task x input shape), their inputs and reducer settings.

An experiment fixes the backbone preset, the task head and the input shape of one of PuMer's released settings
(docs/experiments.md): ViLT at 384 px; METER at 288 px for NLVR2 and 384 px for VQA and SNLI-VE; text padded
to 40 tokens (32 for VQA) with real attention masks of varied length; two images per example for NLVR2 (two
backbone passes, one per image, and the head on the concatenated pooled features). Weights are random: speed,
memory and FLOPs do not depend on them.

A tiny variant of every experiment (``tiny_<exp>`` or ``--tiny``) runs the same code on the tiny presets in
milliseconds, for tests and smoke runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from pumer_lightning.models import Backbone
from pumer_lightning.models.base import ReducerImpl
from pumer_lightning.reduce import ReducerSchedule, ablation
from pumer_lightning.reduce.released import RELEASED
from pumer_lightning.tasks import TASK_CLASSES, BackboneSpec, VLTask

TINY_PREFIX = "tiny_"

# (cls, sep, pad) ids of the text tokenizers: BERT for ViLT, RoBERTa for METER
SPECIAL_IDS = {"vilt": (101, 102, 0), "meter": (0, 2, 1)}


@dataclass(frozen=True)
class Experiment:
    """One backbone x task x input shape.

    Attributes:
        name: ``vilt_nlvr2`` ...; tiny variants are called ``tiny_vilt_nlvr2`` ...
        preset: the `build_backbone` preset.
        task: the head (`build_head` task name).
        text_len: padded text length of a batch.
        images_per_example: 2 for NLVR2 (two backbone passes), else 1.
        released: the released PuMer schedule, with real block ids.
        tiny: True for the tiny variant.
    """

    name: str
    preset: str
    task: str
    text_len: int
    images_per_example: int
    released: ReducerSchedule
    tiny: bool = False

    @property
    def family(self) -> str:
        return self.preset.split("_")[0]

    @property
    def num_token_types(self) -> int:
        return 1 + self.images_per_example


def _full(name: str, preset: str, task: str) -> Experiment:
    released = RELEASED[name]
    return Experiment(
        name=name,
        preset=preset,
        task=task,
        text_len=released.n_text,
        images_per_example=2 if task == "nlvr2" else 1,
        released=released.schedule,
    )


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        _full("vilt_nlvr2", "vilt_b32", "nlvr2"),
        _full("vilt_vqa2", "vilt_b32", "vqa2"),
        _full("vilt_snli_ve", "vilt_b32", "snli_ve"),
        _full("meter_nlvr2", "meter_b16_288", "nlvr2"),
        _full("meter_vqa2", "meter_b16_384", "vqa2"),
        _full("meter_snli_ve", "meter_b16_384", "snli_ve"),
    )
}

# The tiny presets have 4 ViLT blocks / 3 METER co-attention blocks; the released ratios are kept and the
# layers placed as the released ones are: not the first block for "258"/"246", from the first block for
# "2468"/"0246".
_TINY_LAYERS = {
    "vilt_nlvr2": [1, 2],
    "vilt_vqa2": [1, 2],
    "vilt_snli_ve": [0, 1, 2],
    "meter_nlvr2": [1, 2],
    "meter_vqa2": [0, 1, 2],
    "meter_snli_ve": [0, 1, 2],
}
_TINY_PRESET = {"vilt": "vilt_tiny", "meter": "meter_tiny"}


def get_experiment(name: str, tiny: bool = False) -> Experiment:
    """The experiment called ``name`` (``tiny_<name>`` or ``tiny=True`` for its tiny variant)."""
    if name.startswith(TINY_PREFIX):
        name, tiny = name[len(TINY_PREFIX) :], True
    if name not in EXPERIMENTS:
        choices = ", ".join(EXPERIMENTS)
        raise ValueError(f"unknown bench experiment {name!r}; choose from {choices} (or tiny_<name>)")
    exp = EXPERIMENTS[name]
    if not tiny:
        return exp
    released = ReducerSchedule(**{**asdict(exp.released), "layers": _TINY_LAYERS[name]})
    return Experiment(
        name=TINY_PREFIX + name,
        preset=_TINY_PRESET[exp.family],
        task=exp.task,
        text_len=exp.text_len,
        images_per_example=exp.images_per_example,
        released=released,
        tiny=True,
    )


# ---- settings ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """A reducer configuration to measure; ``schedule=None`` is the unreduced baseline."""

    name: str
    kind: str  # baseline | released | ablation | sweep
    description: str
    schedule: ReducerSchedule | None = None

    def schedule_dict(self) -> dict | None:
        return None if self.schedule is None else asdict(self.schedule)


ABLATIONS = ("prune_only", "merge_only", "no_text_merge", "random_prune")
"""The ablations the bench measures by default: names of `pumer_lightning.reduce.ABLATIONS` (one table, one meaning
per name for the bench, the study and tuning)."""
DEFAULT_KEEP_SWEEP = (0.5, 0.7, 0.9)


def make_settings(
    exp: Experiment,
    keep_sweep: tuple[float, ...] = DEFAULT_KEEP_SWEEP,
    ablations: tuple[str, ...] = ABLATIONS,
) -> list[Setting]:
    """Baseline, the released setting, its ablations and a keep-ratio sweep (released merge/text ratios).

    The ablations change one thing each against the released setting, at its layers, as
    `pumer_lightning.reduce.ablation` makes them (`pumer_lightning.reduce.ABLATIONS` says what each changes); by
    default ``prune_only``, ``merge_only`` (ToMe), ``no_text_merge`` and ``random_prune``. An ablation that
    reduces nothing is left out. Sweep points equal to the released keep ratio are the released setting and are
    not repeated. Descriptions are ``str(schedule)``.
    """
    rel = exp.released
    settings = [
        Setting("baseline", "baseline", "unreduced model"),
        Setting("pumer", "released", f"released PuMer: {rel}", rel),
    ]
    for name in ablations:
        schedule = ablation(rel, name)
        if schedule.is_active:
            settings.append(Setting(name, "ablation", str(schedule), schedule))
    for keep in keep_sweep:
        if abs(keep - rel.keep_ratio) < 1e-9:
            continue
        schedule = dataclasses.replace(rel, layers=list(rel.layers), keep_ratio=float(keep))
        settings.append(Setting(f"keep_{keep:g}", "sweep", str(schedule), schedule))
    return settings


# ---- model and inputs -------------------------------------------------------------------------------------------
def build_task(exp: Experiment, seed: int = 0, reducer_impl: ReducerImpl | None = None) -> VLTask:
    """The experiment's task module as a fine-tune builds it (its `BackboneSpec`, random weights, unreduced), in eval
    mode; the bench times its own forward, `VLTask.compute_logits` (NLVR2: one backbone pass per image).

    ``reducer_impl``: the backbone's reduction step (None: its default). The bench captures CUDA graphs itself
    (``--cuda-graph``), so the task's own are off.
    """
    torch.manual_seed(seed)
    spec = BackboneSpec(exp.preset, reducer_impl=reducer_impl or "auto", cuda_graphs=False)
    return TASK_CLASSES[exp.task](backbone=spec).eval()


def make_batch(exp: Experiment, backbone: Backbone, batch_size: int, seed: int = 0) -> dict[str, Tensor]:
    """A batch as the task's collate makes it: random images, ``pixel_values`` (B, images_per_example, 3, H, W), and
    token ids with real attention masks.

    Real text lengths are drawn uniformly from [0.4 L, L] (L = the padded length) and the first example has the
    full length, so the batch is padded to exactly L as a collate function would pad it. Each text is
    ``[CLS] w ... w [SEP] pad ...`` with the family's special ids and words drawn above the special-token range.
    """
    gen = torch.Generator().manual_seed(seed)
    length = exp.text_len
    lengths = torch.randint(max(3, round(0.4 * length)), length + 1, (batch_size,), generator=gen)
    lengths[0] = length
    cls_id, sep_id, pad_id = SPECIAL_IDS[backbone.family]
    vocab = backbone.config.vocab_size
    low = min(1000, vocab // 2)
    ids = torch.randint(low, vocab, (batch_size, length), generator=gen)
    positions = torch.arange(length)[None]
    mask = (positions < lengths[:, None]).long()
    ids[:, 0] = cls_id
    ids[positions == (lengths[:, None] - 1)] = sep_id
    ids[mask == 0] = pad_id
    size = backbone.image_size
    images = [torch.randn(batch_size, 3, size, size, generator=gen) for _ in range(exp.images_per_example)]
    return {"pixel_values": torch.stack(images, dim=1), "input_ids": ids, "attention_mask": mask}
