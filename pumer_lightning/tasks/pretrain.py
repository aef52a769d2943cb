"""Pre-training without task labels: ViLT's image-text matching (ITM) and masked language modelling (MLM) over
image-caption pairs, the stand-in for the vision-language pre-training every PuMer fine-tune starts from.

The data are a retrieval split (``--data.task=retrieval``: captions with their images, e.g. the shapes world's
captions). Every step runs the backbone twice, as ViLT does (docs/experiments.md#pre-training):

* **MLM**: each caption with its own image, 15% of its real tokens chosen (never padding or special tokens), and
  of those 80% replaced by ``[MASK]``, 10% by a random word, 10% left as they are (BERT's rule); a head on the final
  text states predicts the chosen tokens.
* **ITM**: exactly half the captions stay with their image (match), the other half are swapped for a caption of
  another image (no match); a linear head on the pooled features tells them apart. When the records carry shapes
  scenes, a swapped caption also names an object its image lacks, so every negative is a real mismatch.

Validation and test pair every caption of the split with its image and with one drawn negative (a generator
seeded by the batch: the same pairs and masks every epoch) and report ``itm_acc`` and ``mlm_acc``.

At the end of ``fit`` the backbone is written to ``export`` in the converted-checkpoint format (no head), so any
task fine-tunes from it with ``--model.backbone.checkpoint=<export>`` (a new head, initialised by the seed).
`ensure_pretrained` makes such a checkpoint once with the ordinary command line and caches it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from pumer_lightning.data.facts import DataFacts
from pumer_lightning.data.shapes import COLORS, SHAPES
from pumer_lightning.models import Backbone
from pumer_lightning.reduce import ReducerSchedule

from .base import STAGES, BackboneSpec, OptimConfig, Scored, StepOutput, TokenTally, VLTask, stage_key

#: Label of the tokens MLM does not predict (cross-entropy's ``ignore_index``).
IGNORE = -100
#: One bit per (colour, shape) object of the shapes world.
OBJECT_BITS: dict[tuple[str, str], int] = {
    pair: 1 << i for i, pair in enumerate((c, s) for c in COLORS for s in SHAPES)
}
ALL_OBJECTS = (1 << len(OBJECT_BITS)) - 1
_NAMED = re.compile(rf"\b({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})s?\b")


# ---------------------------------------------------------------------------------------------- masking, negatives
def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_id: int,
    special_ids: Tensor,
    replace_ids: Tensor,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masking: ``(masked input_ids, labels)``; labels hold the original id at chosen positions, else
    `IGNORE`. A position is a candidate when it is a real token (``attention_mask`` 1) and not a special token;
    each candidate is chosen with probability ``prob``; a chosen token becomes ``mask_id`` (80%), a random id of
    ``replace_ids`` (10%) or stays (10%). Random numbers are drawn on the CPU (the same draws on every device)."""
    shape = input_ids.shape
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special_ids.to(input_ids.device))
    draw = torch.rand(shape, generator=generator).to(input_ids.device)
    action = torch.rand(shape, generator=generator).to(input_ids.device)
    pick = torch.randint(len(replace_ids), shape, generator=generator)
    words = replace_ids[pick].to(input_ids.device)
    chosen = candidates & (draw < prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), words, masked)
    return masked, labels


@functools.lru_cache(maxsize=65536)
def named_objects(text: str) -> int:
    """Bits of the (colour, shape) objects a text names ("a red circle ..."); 0 when it names none."""
    bits = 0
    for color, shape in _NAMED.findall(text.lower()):
        bits |= OBJECT_BITS[(color, shape)]
    return bits


def scene_objects(meta: Any) -> int:
    """Bits of the objects in a record's first scene (shapes records carry ``scenes``); every bit when unknown."""
    scenes = meta.get("scenes") if isinstance(meta, dict) else None
    if not scenes:
        return ALL_OBJECTS
    bits = 0
    for obj in scenes[0]:
        bits |= OBJECT_BITS.get((obj.get("color"), obj.get("shape")), 0)
    return bits


def draw_negatives(
    row_images: Tensor,
    cand_images: Tensor,
    row_objects: Tensor | None = None,
    cand_objects: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """For each row (an image), the index of a candidate caption that does not describe it, drawn uniformly.

    A candidate qualifies when it belongs to another image and, where objects are known (`scene_objects`,
    `named_objects` bits), names an object the row's image lacks; a row for which no candidate names a missing
    object (or whose scene is unknown) falls back to any caption of another image.
    """
    allowed = row_images.reshape(-1, 1) != cand_images.reshape(1, -1)
    if row_objects is not None and cand_objects is not None:
        absent = (cand_objects.reshape(1, -1) & ~row_objects.reshape(-1, 1)) != 0
        strict = allowed & absent
        allowed = torch.where(strict.any(dim=1, keepdim=True), strict, allowed)
    if not bool(allowed.any(dim=1).all()):
        raise ValueError(
            "an ITM row has no caption of another image to pair with: the batch holds captions of a single image; "
            "raise --data.batch_size"
        )
    return torch.multinomial(allowed.float().cpu(), 1, generator=generator).squeeze(1).to(row_images.device)


def single_images(batch: dict[str, Any]) -> Tensor:
    """(B, 3, H, W) pixels of a one-image batch (the loaders give (B, 1, 3, H, W))."""
    pixels = batch["pixel_values"]
    return pixels[:, 0] if pixels.dim() == 5 else pixels


# ---------------------------------------------------------------------------------------------- heads
class MLMHead(nn.Module):
    """BERT's MLM head: ``Linear -> GELU -> LayerNorm -> Linear(vocab)`` on final text states."""

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.decoder = nn.Linear(width, vocab_size)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, states: Tensor) -> Tensor:
        return self.decoder(self.transform(states))


def text_width(backbone: Backbone) -> int:
    """Width of ``BackboneOutput.text_states`` (METER pools ``[text ; image]``, so its text half)."""
    return backbone.hidden_size // 2 if backbone.family == "meter" else backbone.hidden_size


# ---------------------------------------------------------------------------------------------- the task
class PretrainTask(VLTask):
    """ITM + MLM pre-training on a retrieval split (module docstring).

    Args:
        mlm_prob: fraction of real, non-special caption tokens MLM predicts (0.15 in BERT and ViLT).
        itm_weight: weight of the ITM loss.
        mlm_weight: weight of the MLM loss.
        export: directory the backbone is written to when ``fit`` ends (converted-checkpoint format, no head);
            None writes nothing.
        backbone, reducer, optim, predictions_dir: as for `VLTask` (a reducer may prune and merge image tokens;
            it may not merge text tokens, which MLM predicts one by one).
    """

    task_name = "pretrain"
    data_task = "retrieval"

    def __init__(
        self,
        mlm_prob: float = 0.15,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        export: str | None = None,
        backbone: BackboneSpec = BackboneSpec(),  # noqa: B008 (never mutated)
        reducer: ReducerSchedule = ReducerSchedule(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        predictions_dir: str | None = None,
    ) -> None:
        if not 0.0 < mlm_prob < 1.0:
            raise ValueError(f"--model.mlm_prob must be in (0, 1), got {mlm_prob}")
        if itm_weight < 0 or mlm_weight < 0 or itm_weight + mlm_weight == 0:
            raise ValueError("--model.itm_weight and --model.mlm_weight must be >= 0, not both 0")
        if reducer is not None and reducer.is_active and reducer.text_merge_ratio > 0:
            raise ValueError(
                "--model.reducer.text_merge_ratio must be 0 for pre-training: MLM predicts every masked text token"
            )
        if backbone is None or backbone.tokenizer is None:
            raise ValueError(
                "--model.backbone.tokenizer is required: MLM needs the [MASK] and special token ids"
            )
        self.mlm_prob, self.itm_weight, self.mlm_weight = mlm_prob, itm_weight, mlm_weight
        self.export = None if export in (None, "None", "null", "") else export
        super().__init__(backbone, reducer, optim, None, predictions_dir)
        from pumer_lightning.data import load_tokenizer

        tok = load_tokenizer(backbone.tokenizer)
        if tok.mask_token_id is None:
            raise ValueError(f"--model.backbone.tokenizer {backbone.tokenizer} has no mask token")
        self.mask_id = int(tok.mask_token_id)
        special = sorted(set(tok.all_special_ids))
        self.special_ids = torch.tensor(special, dtype=torch.long)
        self.replace_ids = torch.tensor([i for i in range(len(tok)) if i not in special], dtype=torch.long)
        self.exported: Path | None = None

    def build_head(self) -> nn.Module:
        return nn.ModuleDict(
            {
                "itm": nn.Linear(self.backbone.hidden_size, 2),
                "mlm": MLMHead(text_width(self.backbone), self.backbone.vocab_size),
            }
        )

    def build_metrics(self) -> None:
        vocab = self.backbone.vocab_size
        self.itm_accuracy = nn.ModuleDict(
            {stage_key(s): MulticlassAccuracy(num_classes=2, average="micro") for s in STAGES}
        )
        self.mlm_accuracy = nn.ModuleDict(
            {stage_key(s): MulticlassAccuracy(num_classes=vocab, average="micro") for s in STAGES}
        )

    def check_data(self, facts: DataFacts) -> None:
        task = facts.task
        if task is not None and task != self.data_task:
            raise ValueError(
                f"data.task is {task!r} but PretrainTask reads image-caption pairs: set --data.task=retrieval "
                "and --data.data_dir to a retrieval split (e.g. the shapes world's captions)"
            )

    # ------------------------------------------------------------------------------------------ pairs
    def masked(self, ids: Tensor, mask: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        return mask_tokens(
            ids,
            mask,
            mask_id=self.mask_id,
            special_ids=self.special_ids,
            replace_ids=self.replace_ids,
            prob=self.mlm_prob,
            generator=generator,
        )

    def training_pairs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A training batch (captions with their images) -> the ITM and MLM rows of the step (global RNG)."""
        ids, mask, images = batch["input_ids"], batch["attention_mask"], batch["image_ids"]
        n = ids.shape[0]
        metas = batch.get("meta") or [{}] * n
        texts = [m.get("text", "") if isinstance(m, dict) else "" for m in metas]
        row_objects = torch.tensor([scene_objects(m) for m in metas], device=images.device)
        cand_objects = torch.tensor([named_objects(t) for t in texts], device=images.device)
        negative = draw_negatives(images, images, row_objects, cand_objects)
        swap = torch.zeros(n, dtype=torch.bool)
        swap[torch.randperm(n)[: n // 2]] = True
        swap = swap.to(ids.device)
        rows = torch.arange(n, device=ids.device)
        text_index = torch.where(swap, negative, rows)
        mlm_ids, mlm_labels = self.masked(ids, mask, None)
        return {
            "pixel_values": single_images(batch),
            "itm_rows": rows,
            "itm_input_ids": ids[text_index],
            "itm_attention_mask": mask[text_index],
            "itm_labels": (~swap).long(),
            "mlm_rows": rows,
            "mlm_input_ids": mlm_ids,
            "mlm_attention_mask": mask,
            "mlm_labels": mlm_labels,
        }

    def eval_pairs(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        """An evaluation batch (images only) -> every caption of those images as a match, each with one drawn
        negative, and the MLM rows; the draws are seeded by the batch's image ids."""
        texts = self.data_facts.retrieval_texts(self.data_facts.split(stage))
        image_ids = batch["image_ids"].cpu()
        generator = torch.Generator().manual_seed(int(image_ids.sum()) * 1_000_003 + int(image_ids.numel()))
        row_of_image = {int(i): r for r, i in enumerate(image_ids.tolist())}
        captions = [c for c, i in enumerate(texts.image_ids.tolist()) if int(i) in row_of_image]
        if not captions:
            return {}
        rows = torch.tensor([row_of_image[int(texts.image_ids[c])] for c in captions])
        metas = batch.get("meta") or [{}] * len(image_ids)
        objects = torch.tensor([scene_objects(m) for m in metas])
        named = torch.tensor([named_objects(t) for t in texts.texts])
        negative = draw_negatives(texts.image_ids[captions], texts.image_ids, objects[rows], named, generator)
        tok = texts.collator.tokenize([texts.texts[c] for c in captions + negative.tolist()])
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        n = len(captions)
        mlm_ids, mlm_labels = self.masked(ids[:n], mask[:n], generator)
        rows = rows.to(self.device)
        return {
            "pixel_values": single_images(batch),
            "itm_rows": torch.cat([rows, rows]),
            "itm_input_ids": ids,
            "itm_attention_mask": mask,
            "itm_labels": torch.cat([torch.ones(n), torch.zeros(n)]).long().to(self.device),
            "mlm_rows": rows,
            "mlm_input_ids": mlm_ids,
            "mlm_attention_mask": mask[:n],
            "mlm_labels": mlm_labels,
        }

    def example_batch(self, batch_size: int = 1) -> dict[str, Tensor]:
        """A training step's pairs for ``batch_size`` captions (`training_pairs`' keys): each caption with its image
        for ITM and MLM, one negative each for ITM, the second token of every MLM text chosen."""
        plain = super().example_batch(batch_size)
        ids, mask = plain["input_ids"], plain["attention_mask"]
        rows = torch.arange(batch_size)
        labels = torch.full_like(ids, IGNORE)
        labels[:, 1] = ids[:, 1]
        return {
            "pixel_values": plain["pixel_values"][:, 0],
            "itm_rows": torch.cat([rows, rows]),
            "itm_input_ids": torch.cat([ids, ids]),
            "itm_attention_mask": torch.cat([mask, mask]),
            "mlm_rows": rows,
            "mlm_input_ids": ids,
            "mlm_attention_mask": mask,
            "mlm_labels": labels,
        }

    # ------------------------------------------------------------------------------------------ steps
    def compute_logits(self, batch: dict[str, Any], backbone: Backbone, head: nn.Module) -> Scored:
        """ITM logits (R, 2) and MLM logits (masked tokens, vocab) with their targets, from two passes."""
        pixels, tokens = batch["pixel_values"], TokenTally()
        itm = self.encode(
            backbone, pixels[batch["itm_rows"]], batch, 0, batch["itm_input_ids"], batch["itm_attention_mask"]
        )
        tokens.add(itm.trace, len(batch["itm_rows"]))
        mlm = self.encode(
            backbone, pixels[batch["mlm_rows"]], batch, 0, batch["mlm_input_ids"], batch["mlm_attention_mask"]
        )
        tokens.add(mlm.trace, len(batch["mlm_rows"]))
        chosen = batch["mlm_labels"] != IGNORE
        logits = {
            "itm": head["itm"](itm.pooled),
            "mlm": head["mlm"](mlm.text_states[chosen]),
            "mlm_targets": batch["mlm_labels"][chosen],
        }
        return Scored(logits, tokens)

    def losses(self, logits: dict[str, Tensor], batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        itm = F.cross_entropy(logits["itm"].float(), batch["itm_labels"])
        mlm_logits = logits["mlm"].float()
        if mlm_logits.shape[0] == 0:  # no token chosen in this batch: a zero that keeps the graph
            mlm = mlm_logits.sum()
        else:
            mlm = F.cross_entropy(mlm_logits, logits["mlm_targets"])
        return itm, mlm

    def step(self, batch: dict[str, Any], stage: str, examples: int) -> StepOutput:
        logits, tokens = self.compute_logits(batch, self.backbone, self.head)
        tokens.examples = examples
        itm, mlm = self.losses(logits, batch)
        loss = self.itm_weight * itm + self.mlm_weight * mlm
        train = stage == "train"
        for name, value in (("loss", loss), ("loss_itm", itm), ("loss_mlm", mlm)):
            self.log(
                f"{stage}/{name}",
                value,
                batch_size=examples,
                prog_bar=train and name == "loss",
                on_step=train,
                on_epoch=not train,
                sync_dist=not train,
            )
        self.itm_accuracy[stage_key(stage)].update(logits["itm"].argmax(-1), batch["itm_labels"])
        if logits["mlm_targets"].numel():
            self.mlm_accuracy[stage_key(stage)].update(logits["mlm"].argmax(-1), logits["mlm_targets"])
        return {"loss": loss, "tokens": tokens}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        return self.step(self.training_pairs(batch), "train", self.batch_size_of(batch))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        return self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        pairs = self.eval_pairs(batch, stage)
        if not pairs:
            return {"loss": None, "tokens": TokenTally(examples=self.batch_size_of(batch))}
        return self.step(pairs, stage, len(pairs["mlm_rows"]))

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        raise NotImplementedError(
            "PretrainTask has nothing to predict: fit it, then fine-tune from its export"
        )

    def log_epoch_metrics(self, stage: str) -> None:
        for name, metrics in (("itm_acc", self.itm_accuracy), ("mlm_acc", self.mlm_accuracy)):
            metric = metrics[stage_key(stage)]
            if self.has_updates(metric):
                self.log(f"{stage}/{name}", metric.compute(), prog_bar=stage == "val", sync_dist=True)
            metric.reset()

    # ------------------------------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        """Write the backbone to ``export`` (rank 0; atomically: a stopped write leaves the old one), with the last
        validation's figures."""
        if self.export is None or self.trainer.fast_dev_run or not self.trainer.is_global_zero:
            return  # a smoke run (fast_dev_run) never replaces a real export
        from pumer_lightning.models.checkpoint import save_checkpoint

        metrics = self.trainer.callback_metrics
        figures = {k.split("/")[1]: float(metrics[k]) for k in ("val/itm_acc", "val/mlm_acc") if k in metrics}
        final = Path(self.export)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        info = {
            "objectives": "itm+mlm",
            "mlm_prob": self.mlm_prob,
            "steps": int(self.trainer.global_step),
            "run_dir": str(self.trainer.log_dir or ""),
            **figures,
        }
        save_checkpoint(tmp, self.backbone, preset=self.spec.preset, extra={"pretraining": info})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        self.exported = final
        print(f"pre-trained backbone: {final} ({json.dumps(info)})", flush=True)


# ---------------------------------------------------------------------------------------------- the cache
#: Written next to a cached checkpoint: what made it (`ensure_pretrained` remakes it when the key differs).
MADE_BY = "made_by.json"


@dataclass
class Pretrained:
    """A pre-trained checkpoint made (or found) by `ensure_pretrained`."""

    path: Path
    command: str
    key: str
    made_now: bool
    seconds: float
    figures: dict[str, Any]


def pretrain_key(files: list[str | Path], overrides: list[str]) -> str:
    """What a pre-training run depends on: its config files' contents and its command-line overrides."""
    blob = json.dumps([[Path(f).read_text() for f in files], list(overrides)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_pretrained(
    files: list[str | Path], out: str | Path, overrides: list[str] = (), make: bool = True
) -> Pretrained:
    """The backbone ``python -m pumer_lightning fit -c F1 -c F2 ... --model.init_args.export=OUT`` writes, made
    once: reused while ``OUT/made_by.json`` records the same `pretrain_key`, else (re)made with that command (in a
    child process, so nothing of it stays in this one). Raises SystemExit naming the command if it fails, or
    (``make=False``) instead of making it."""
    out = Path(out)
    args = [a for f in files for a in ("-c", str(f))] + [*overrides, f"--model.init_args.export={out}"]
    command = "python -m pumer_lightning fit " + " ".join(args)
    key = pretrain_key(files, [*overrides, str(out)])
    record = out / MADE_BY
    try:
        made = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        made = {}
    config = out / "pumer_config.json"
    if made.get("key") == key and config.is_file():
        figures = json.loads(config.read_text()).get("pretraining", {})
        return Pretrained(
            out, made.get("command", command), key, False, float(made.get("seconds", 0)), figures
        )
    why = (
        "missing"
        if not config.is_file()
        else "made from other settings"
        if made
        else "no record of what made it"
    )
    if not make:
        raise SystemExit(
            f"error: no pre-trained weights made by these settings in {out} ({why}); make them: {command}"
        )
    print(
        f"pre-training the starting weights ({out}: {why}; once, later runs reuse them):\n  {command}",
        flush=True,
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pumer_lightning", "fit", *args], check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or not config.is_file():
        raise SystemExit(
            f"error: pre-training failed (exit status {done.returncode}); run it alone: {command}"
        )
    record.write_text(
        json.dumps({"key": key, "command": command, "seconds": round(seconds, 1)}, indent=1) + "\n"
    )
    figures = json.loads(config.read_text()).get("pretraining", {})
    return Pretrained(out, command, key, True, seconds, figures)


def configured_value(files: list[str], overrides: list[str], key: str) -> Any:
    """The value of dotted ``key`` in the configuration the CLI composes (``files`` in order, then the
    ``--a.b=c`` overrides; ``--model.x`` is ``--model.init_args.x``), interpolations resolved; None when unset."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.merge(*(OmegaConf.load(f) for f in files))
    for item in overrides:
        name, sep, value = item[2:].partition("=")
        if name == "model":  # --model=<class>: the class, init_args kept
            name = "model.class_path"
        elif name.startswith("model.") and not name.startswith(("model.init_args.", "model.class_path")):
            name = "model.init_args." + name[len("model.") :]
        if not sep:
            continue
        try:
            cfg.merge_with(OmegaConf.from_dotlist([f"{name}={value}"]))
        except OmegaConfBaseException:  # a value OmegaConf cannot read: it names no path here
            continue
    return OmegaConf.select(cfg, key, default=None)


def starting_weights(files: list[str], overrides: list[str]) -> Pretrained | None:
    """Make (once) the pre-trained backbone the experiment fine-tunes from, when its ``backbone.checkpoint`` is
    ``<dir>/pretrained/<NAME>`` and ``<NAME>.yaml`` exists beside ``files[0]``: that experiment's fit writes it
    (`ensure_pretrained`: cached, remade when its config files change). None for any other starting point."""
    checkpoint = configured_value(files, overrides, "model.init_args.backbone.checkpoint")
    if checkpoint in (None, "None", "null", ""):
        return None
    path = Path(str(checkpoint))
    source = Path(files[0]).parent / f"{path.name}.yaml"
    if path.parent.name != "pretrained" or not source.is_file():
        return None
    data_root = configured_value(files, overrides, "data_root") or "data"
    return ensure_pretrained([shown(files[0]), shown(source)], path, [f"--data_root={data_root}"])


def shown(path: str | Path) -> Path:
    """``path`` relative to the working directory when it lies below it (for the commands printed)."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path
