"""Pictures of what the reducer did: which patches were kept, pruned and merged, and which words were merged.

For a few fixed validation examples (the first ones of the first validation batch; the evaluation stream is
unshuffled, so they are the same every epoch) the callback reruns the backbone with patch maps and draws one
row per image: the input, then the image after each reduction step, where

* pruned patches are dark,
* patches merged into one token share a colour (one colour per merged group),
* kept, unmerged patches are shown as they are,

with the step's token count above each panel and the text underneath, merged words joined by ``+`` in the same
colour. Images go to TensorBoard (``token_vis/example_N``) and, as PNG, to ``<log_dir>/token_vis/``; the text
merges also go to TensorBoard's text tab (``token_vis/text/example_N``).
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from pumer_lightning.data.facts import DataFacts

from .token_stats import tensorboard_writer

_PAD = 6
_HEADER = 14


def group_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated colours (golden-ratio hue steps)."""
    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def reduction_panel(image: np.ndarray, patch_map: Tensor, grid: int) -> np.ndarray:
    """Draw one reduction state on an (H, W, 3) uint8 image.

    Args:
        image: the input image.
        patch_map: (1 + grid * grid,) current token index of each original image token (index 0 is the image
            CLS), -1 for pruned ones.
        grid: patches per side.
    """
    h, w = image.shape[:2]
    ph, pw = h // grid, w // grid
    out = image.astype(np.float32).copy()
    current = patch_map[1:].tolist()
    counts: dict[int, int] = {}
    for c in current:
        if c >= 0:
            counts[c] = counts.get(c, 0) + 1
    merged = sorted(c for c, n in counts.items() if n > 1)
    colors = dict(zip(merged, group_colors(len(merged))))
    for p, c in enumerate(current):
        r, q = divmod(p, grid)
        cell = out[r * ph : (r + 1) * ph, q * pw : (q + 1) * pw]
        if c < 0:
            cell *= 0.18
        elif c in colors:
            cell[:] = 0.45 * cell + 0.55 * np.asarray(colors[c], dtype=np.float32)
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for p, c in enumerate(current):  # outline merged groups' cells so that groups stay readable
        if c in colors:
            r, q = divmod(p, grid)
            draw.rectangle((q * pw, r * ph, (q + 1) * pw - 1, (r + 1) * ph - 1), outline=colors[c])
    return np.asarray(picture)


def text_groups(tokens: list[str], text_map: Tensor | None, mask: Tensor) -> list[list[str]]:
    """Real tokens grouped by the token they ended up in (reading order); singletons are one-element groups."""
    real = [i for i in range(len(tokens)) if int(mask[i])]
    if text_map is None:
        return [[tokens[i]] for i in real]
    groups: dict[int, list[str]] = {}
    order: list[int] = []
    for i in real:
        c = int(text_map[i])
        if c < 0:
            continue
        if c not in groups:
            groups[c] = []
            order.append(c)
        groups[c].append(tokens[i])
    return [groups[c] for c in order]


def text_markdown(groups: list[list[str]]) -> str:
    return " ".join(f"**[{' + '.join(g)}]**" if len(g) > 1 else g[0] for g in groups)


class TokenVisCallback(pl.Callback):
    """Logs pictures of kept / pruned / merged patches and merged words for fixed validation examples.

    Args:
        num_examples: how many examples of the first validation batch to draw.
        every_n_epochs: draw at the end of every n-th validation epoch.
        scale: integer upscaling of small images (nearest neighbour) so that patches stay visible.
        save_png: also write PNG files under ``<log_dir>/token_vis/``.
    """

    def __init__(
        self, num_examples: int = 4, every_n_epochs: int = 1, scale: int = 0, save_png: bool = True
    ) -> None:
        if num_examples < 1:
            raise ValueError(f"TokenVisCallback.num_examples must be >= 1, got {num_examples}")
        self.num_examples = num_examples
        self.every_n_epochs = max(1, every_n_epochs)
        self.scale = scale
        self.save_png = save_png
        self._examples: dict[str, Any] | None = None
        self._tokenizer = None
        self._data = DataFacts()
        self.written: list[Path] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Read the data module's facts (validation captions, tokenizer, pixel normalisation) once."""
        self._data = DataFacts.of(getattr(trainer, "datamodule", None))

    # ------------------------------------------------------------------------------------------ capture
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._examples is not None or batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        n = min(self.num_examples, int(batch["pixel_values"].shape[0]))
        ex: dict[str, Any] = {
            "pixel_values": batch["pixel_values"][:n].detach().cpu(),
            "keys": list(batch["keys"][:n]),
        }
        if "input_ids" in batch:
            ex["input_ids"] = batch["input_ids"][:n].detach().cpu()
            ex["attention_mask"] = batch["attention_mask"][:n].detach().cpu()
        else:  # retrieval evaluation streams images only: pair each image with its first caption
            ex.update(self._first_captions(batch["image_ids"][:n].tolist()))
        self._examples = ex

    def _first_captions(self, image_ids: list[int]) -> dict[str, Tensor]:
        texts = self._data.retrieval_texts(self._data.split("val"))
        positions = []
        for image_id in image_ids:
            hits = (texts.image_ids == image_id).nonzero().flatten()
            positions.append(int(hits[0]) if hits.numel() else 0)
        return texts.collator.tokenize([texts.texts[p] for p in positions])

    def _tokens(self, input_ids: Tensor) -> list[list[str]]:
        if self._tokenizer is None:
            from pumer_lightning.data import load_tokenizer

            self._tokenizer = load_tokenizer(self._data.tokenizer_dir)
        return [self._tokenizer.convert_ids_to_tokens(row.tolist()) for row in input_ids]

    # ------------------------------------------------------------------------------------------ drawing
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._examples is None:
            return
        if trainer.current_epoch % self.every_n_epochs and not trainer.is_last_batch:
            return
        log_dir = trainer.log_dir  # on every rank: under DDP it is a broadcast
        self.draw(trainer, pl_module, log_dir)

    @rank_zero_only
    def draw(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, log_dir: str | None = None
    ) -> list[np.ndarray]:
        """Draw the fixed examples (rank 0; pass ``log_dir`` read on every rank for the PNG files)."""
        backbone = pl_module.backbone
        schedule = backbone.reducer
        if schedule is None or not schedule.is_active:
            return []
        ex = self._examples
        assert ex is not None
        device = pl_module.device
        pixels = ex["pixel_values"].to(device)
        ids, mask = ex["input_ids"].to(device), ex["attention_mask"].to(device)
        if pixels.dim() == 4:
            pixels = pixels[:, None]
        mean, std = torch.tensor(self._data.image_mean), torch.tensor(self._data.image_std)
        grid = backbone.image_size // backbone.patch_size
        tokens = self._tokens(ex["input_ids"])
        was_training = pl_module.training
        pl_module.eval()
        pictures = []
        try:
            with torch.no_grad():
                for image_index in range(pixels.shape[1]):
                    out = backbone(
                        pixels[:, image_index], ids, mask, image_index=image_index, track_maps=True
                    )
                    trace = out.trace
                    steps = schedule.plan(trace.image_tokens[0], trace.text_tokens[0])
                    images = self._to_uint8(pixels[:, image_index].cpu(), mean, std)
                    for b in range(pixels.shape[0]):
                        pictures.append(
                            (
                                b,
                                image_index,
                                self._compose(
                                    images[b], trace, steps, b, grid, tokens[b], ex["attention_mask"][b]
                                ),
                            )
                        )
        finally:
            pl_module.train(was_training)
        writer = tensorboard_writer(trainer)
        step = trainer.global_step
        out_dir = Path(log_dir) / "token_vis" if log_dir else None
        drawn = []
        for b, image_index, (picture, markdown) in pictures:
            name = f"example_{b}" + (f"_image{image_index}" if pixels.shape[1] > 1 else "")
            drawn.append(picture)
            if writer is not None:
                writer.add_image(f"token_vis/{name}", picture, step, dataformats="HWC")
                if image_index == 0:
                    writer.add_text(f"token_vis/text/example_{b}", f"`{ex['keys'][b]}`: {markdown}", step)
            if self.save_png and out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                path = out_dir / f"step{step:07d}_{name}.png"
                Image.fromarray(picture).save(path)
                self.written.append(path)
        return drawn

    def _to_uint8(self, pixels: Tensor, mean: Tensor, std: Tensor) -> list[np.ndarray]:
        images = pixels.float() * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        scale = self.scale or max(1, 192 // images.shape[1])
        if scale > 1:
            images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        return list(images)

    def _compose(
        self,
        image: np.ndarray,
        trace: Any,
        steps: list[Any],
        b: int,
        grid: int,
        tokens: list[str],
        mask: Tensor,
    ) -> tuple[np.ndarray, str]:
        panels = [(f"input: {trace.image_tokens[0]} img / {trace.text_tokens[0]} txt", image)]
        for step, patch_map in zip(steps, trace.patch_maps):
            label = f"after block {step.layer}: {step.image_out} img / {step.text_out} txt"
            panels.append((label, reduction_panel(image, patch_map[b].cpu(), grid)))
        groups = text_groups(tokens, trace.text_maps[-1][b].cpu() if trace.text_maps else None, mask)
        font = ImageFont.load_default()
        h, w = image.shape[:2]
        width = len(panels) * (w + _PAD) + _PAD
        lines = self._wrap(groups, width - 2 * _PAD, font)
        height = _HEADER + h + _PAD * 2 + 14 * len(lines)
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for i, (label, panel) in enumerate(panels):
            x = _PAD + i * (w + _PAD)
            canvas.paste(Image.fromarray(panel), (x, _HEADER))
            draw.text((x, 1), label[: max(8, w // 6)], fill=(0, 0, 0), font=font)
        colors = group_colors(sum(len(g) > 1 for g in groups))
        y = _HEADER + h + _PAD
        k = 0
        for line in lines:
            x = _PAD
            for group in line:
                word = " + ".join(group) if len(group) > 1 else group[0]
                color = (0, 0, 0)
                if len(group) > 1:
                    color = tuple(int(c * 0.7) for c in colors[k])
                    k += 1
                draw.text((x, y), word, fill=color, font=font)
                x += int(draw.textlength(word + "  ", font=font))
            y += 14
        return np.asarray(canvas), text_markdown(groups)

    @staticmethod
    def _wrap(groups: list[list[str]], width: int, font: Any) -> list[list[list[str]]]:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        lines: list[list[list[str]]] = [[]]
        x = 0.0
        for group in groups:
            word = " + ".join(group) if len(group) > 1 else group[0]
            size = probe.textlength(word + "  ", font=font)
            if lines[-1] and x + size > width:
                lines.append([])
                x = 0.0
            lines[-1].append(group)
            x += size
        return lines
