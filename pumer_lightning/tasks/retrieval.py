"""Image-text retrieval (Flickr30k, COCO): rank loss over sampled negatives + ITM; R@1/5/10 both ways.

Training (docs/official_code_differences.md#b23): every caption of the batch is scored against its own image
and ``num_negatives``
captions of *other* images of the batch, drawn uniformly; the rank scores of the ``1 + K`` pairs go through a
cross-entropy with the positive first, and an ITM head learns match / no match on the same pairs (weight
``itm_weight``). Distillation is a softmax KL over the same ``1 + K`` rank scores (the official code's KL over
``[N, 1]`` logits is identically zero: B16).

Evaluation fills the ``N_img x N_text`` score matrix: the loader streams each rank's share of the images, every
image batch is scored against every caption in chunks of ``pair_batch`` pairs, and the rows are gathered at the
end of the epoch. Text retrieval (TR) and image retrieval (IR) R@k are hit rates (`metrics.recall_at_k`).
With ``rerank``, the matrix comes from a cheaper first pass (a more aggressive reducer schedule), and only each
image's top-k captions and each caption's top-k images are re-scored with the model's own schedule.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pumer_lightning.data.stream import RetrievalTexts
from pumer_lightning.models import Backbone, BackboneSpec, build_head
from pumer_lightning.reduce import ReducerSchedule

from .base import VLTask
from .config import DistillConfig, OptimConfig
from .metrics import recall_at_k, rerank_recall, topk_candidates
from .outputs import Scored, StepOutput, TokenTally

log = logging.getLogger("pumer_lightning.tasks")


@dataclass
class RerankConfig:
    """Evaluate with a cheap first pass over all pairs, then re-score only the top candidates.

    Args:
        top_k: candidates re-scored per image (text retrieval) and per caption (image retrieval).
        first_pass: the reducer schedule of the first pass (e.g. ``keep_ratio: 0.5`` at more layers).
    """

    top_k: int = 16
    first_pass: ReducerSchedule = field(default_factory=ReducerSchedule)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"--model.rerank.top_k must be >= 1, got {self.top_k}")


@dataclass
class _EvalRows:
    image_ids: list[Tensor] = field(default_factory=list)
    scores: list[Tensor] = field(default_factory=list)  # (n, N_text) on CPU


class RetrievalTask(VLTask):
    """Image-text retrieval with a rank head and an ITM head on the pooled features.

    Args:
        num_negatives: captions of other images scored with each image during training (15 in PuMer); capped
            by the other images in the batch.
        itm_weight: weight of the image-text-matching loss (0.5 in PuMer).
        pair_batch: image-text pairs per backbone call during evaluation.
        rerank: first-pass-then-rerank evaluation; None scores every pair with the model's schedule.
        backbone, reducer, optim, distill, predictions_dir: as for `VLTask`.
    """

    task_name = "retrieval"

    def __init__(
        self,
        num_negatives: int = 15,
        itm_weight: float = 0.5,
        pair_batch: int = 256,
        rerank: RerankConfig | None = None,
        backbone: BackboneSpec = BackboneSpec(),  # noqa: B008 (never mutated)
        reducer: ReducerSchedule = ReducerSchedule(),  # noqa: B008
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        distill: DistillConfig | None = None,
        predictions_dir: str | None = None,
    ) -> None:
        if num_negatives < 1:
            raise ValueError(f"--model.num_negatives must be >= 1, got {num_negatives}")
        if pair_batch < 1:
            raise ValueError(f"--model.pair_batch must be >= 1, got {pair_batch}")
        self.num_negatives = num_negatives
        self.itm_weight = itm_weight
        self.pair_batch = pair_batch
        self.rerank = rerank
        super().__init__(backbone, reducer, optim, distill, predictions_dir)
        if rerank is not None:
            rerank.first_pass.check_depth(self.backbone.num_layers, f"{self.spec.preset} (rerank.first_pass)")
        self._rows: dict[str, _EvalRows] = {}
        self.last_scores: dict[str, dict[str, Any]] = {}

    def build_head(self) -> nn.Module:
        return build_head("retrieval", self.backbone.hidden_size)

    # ------------------------------------------------------------------------------------------ training
    def sample_negatives(self, image_ids: Tensor) -> Tensor:
        """(B, K) indices of captions of *other* images of the batch, uniformly drawn without replacement."""
        other = image_ids.reshape(-1, 1) != image_ids.reshape(1, -1)  # (B, B)
        available = int(other.sum(dim=1).min())
        if available == 0:
            raise ValueError(
                "a retrieval training batch holds captions of a single image: there is no negative to sample; "
                "raise --data.batch_size"
            )
        k = min(self.num_negatives, available)
        return torch.multinomial(other.float(), k, replacement=False)

    def example_batch(self, batch_size: int = 1) -> dict[str, Tensor]:
        """``batch_size`` captions, each scored with its own image only (no negatives: one pair per example)."""
        return {
            **super().example_batch(batch_size),
            "negatives": torch.zeros(batch_size, 0, dtype=torch.long),
        }

    def compute_logits(self, batch: dict[str, Any], backbone: Backbone, head: nn.Module) -> Scored:
        """Rank scores (B, 1 + K) and ITM logits (B, 1 + K, 2) for each caption with its image and negatives,
        with the tokens of the B * (1 + K) pairs.

        The negatives are ``batch["negatives"]`` (drawn once per step, so a teacher scores the same pairs).
        """
        pixels = batch["pixel_values"]
        if pixels.dim() == 5:
            pixels = pixels[:, 0]
        negatives = batch["negatives"]  # (B, K)
        bsz, k = negatives.shape
        text_index = torch.cat([torch.arange(bsz, device=negatives.device)[:, None], negatives], dim=1)
        flat = text_index.reshape(-1)  # (B * (1 + K),) caption of each pair; the image is the row's
        images = pixels.repeat_interleave(1 + k, dim=0)
        ids, mask = batch["input_ids"][flat], batch["attention_mask"][flat]
        out = self.encode(backbone, images, batch, 0, input_ids=ids, attention_mask=mask)
        tokens = TokenTally()
        tokens.add(out.trace, images.shape[0])
        scores = head(out.pooled)
        logits = {"rank": scores.rank.reshape(bsz, 1 + k), "itm": scores.itm.reshape(bsz, 1 + k, 2)}
        return Scored(logits, tokens)

    def task_loss(self, logits: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        rank, itm = logits["rank"].float(), logits["itm"].float()
        target = torch.zeros(rank.shape[0], dtype=torch.long, device=rank.device)
        match = torch.zeros(itm.shape[:2], dtype=torch.long, device=itm.device)
        match[:, 0] = 1
        return F.cross_entropy(rank, target) + self.itm_weight * F.cross_entropy(
            itm.reshape(-1, 2), match.reshape(-1)
        )

    def distill_loss(self, student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
        return super().distill_loss(student["rank"], teacher["rank"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        batch = dict(batch)
        batch["negatives"] = self.sample_negatives(batch["image_ids"])
        batch["labels"] = batch["image_ids"]  # marks the batch as supervised for the shared step
        return super().training_step(batch, batch_idx)

    def update_metrics(self, stage: str, logits: dict[str, Tensor], batch: dict[str, Any]) -> None:
        if stage == "train":
            hit = (logits["rank"].argmax(dim=1) == 0).float().mean()
            self.log(
                "train/rank_acc", hit, batch_size=self.batch_size_of(batch), on_step=False, on_epoch=True
            )

    def log_epoch_metrics(self, stage: str) -> None:
        """Training metrics are logged as they come; evaluation metrics at the end of the score matrix."""

    # ------------------------------------------------------------------------------------------ evaluation
    def _split(self, stage: str) -> str:
        split = self.data_facts.split(stage)
        if split is None:
            raise ValueError(f"retrieval {stage}: the data module has no {stage} split")
        return split

    def _texts(self, stage: str) -> RetrievalTexts:
        return self.data_facts.retrieval_texts(self._split(stage))

    @torch.no_grad()
    def score_images(self, pixels: Tensor, stage: str, desc: str = "") -> Scored:
        """Rank scores (n_images, N_text) of a batch of images against every caption of the split, with the
        tokens of every scored pair (``examples == rows``: a scored pair is retrieval evaluation's example)."""
        texts = self._texts(stage)
        tokens = TokenTally()
        n_img = pixels.shape[0]
        chunk = max(1, self.pair_batch // n_img)
        # float32 whatever the default dtype (bf16-true sets bf16 inside the step)
        rows = torch.empty(n_img, len(texts), device=pixels.device, dtype=torch.float32)
        n_chunks = -(-len(texts) // chunk)
        quiet = n_chunks < 20 or not self.trainer.is_global_zero
        bar = tqdm(texts.batches(chunk), total=n_chunks, desc=desc or "score", leave=False, disable=quiet)
        for part in bar:
            ids = part["input_ids"].to(pixels.device)
            mask = part["attention_mask"].to(pixels.device)
            n_txt = ids.shape[0]
            images = pixels.repeat_interleave(n_txt, dim=0)
            out = self.backbone(images, ids.repeat(n_img, 1), mask.repeat(n_img, 1))
            tokens.add(out.trace, images.shape[0])
            score = self.head(out.pooled).rank.reshape(n_img, n_txt)
            index = part["text_index"].to(pixels.device)
            rows[:, index] = score.float()
        tokens.examples = tokens.rows
        return Scored(rows, tokens)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        pixels = batch["pixel_values"]
        if pixels.dim() == 5:
            pixels = pixels[:, 0]
        schedule = self.rerank.first_pass if self.rerank is not None else self.backbone.reducer
        with self.backbone.using(schedule):
            scores, tokens = self.score_images(pixels, stage)
        rows = self._rows.setdefault(stage, _EvalRows())
        rows.image_ids.append(batch["image_ids"].cpu())
        rows.scores.append(scores.cpu())
        return {"tokens": tokens}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> StepOutput:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "predict")

    def on_validation_epoch_start(self) -> None:
        self._rows["val"] = _EvalRows()
        self.skip_report.begin("val", self.data_facts)

    def on_test_epoch_start(self) -> None:
        self._rows["test"] = _EvalRows()
        self.skip_report.begin("test", self.data_facts)

    def on_predict_epoch_start(self) -> None:
        self._rows["predict"] = _EvalRows()
        self.skip_report.begin("predict", self.data_facts)

    def _gather(self, stage: str) -> tuple[Tensor, Tensor]:
        """Every rank's rows of the score matrix, on every rank: (image ids (N_img,), scores (N_img, N_text))."""
        rows = self._rows.pop(stage, _EvalRows())
        n_text = len(self._texts(stage))
        ids = torch.cat(rows.image_ids) if rows.image_ids else torch.empty(0, dtype=torch.long)
        scores = torch.cat(rows.scores) if rows.scores else torch.empty(0, n_text)
        if self.trainer.world_size > 1:
            parts: list[tuple[Tensor, Tensor]] = [None] * self.trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(parts, (ids, scores))
            ids = torch.cat([p[0] for p in parts])
            scores = torch.cat([p[1] for p in parts])
        return ids, scores

    @torch.no_grad()
    def _rerank_scores(self, stage: str, first: Tensor, row_ids: Tensor) -> Tensor:
        """Second-pass scores at the top-k candidates of ``first`` (other entries NaN), for every rank's rows."""
        assert self.rerank is not None
        candidates = topk_candidates(first, self.rerank.top_k)
        position = {int(i): r for r, i in enumerate(row_ids.tolist())}
        second = torch.full_like(first, float("nan"))
        texts = self._texts(stage)
        loader = self.data_facts.eval_loader(self._split(stage))
        desc = f"{stage} rerank top-{self.rerank.top_k}"
        for batch in tqdm(loader, desc=desc, leave=False, disable=not self.trainer.is_global_zero):
            pixels = batch["pixel_values"].to(self.device)
            pixels = pixels[:, 0] if pixels.dim() == 5 else pixels
            for j, image_id in enumerate(batch["image_ids"].tolist()):
                r = position.get(int(image_id))
                if r is None:
                    continue
                cols = candidates[r].nonzero().flatten()
                for start in range(0, cols.numel(), self.pair_batch):
                    sel = cols[start : start + self.pair_batch]
                    tok = texts.collator.tokenize([texts.texts[c] for c in sel.tolist()])
                    ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
                    images = pixels[j : j + 1].expand(sel.numel(), -1, -1, -1)
                    second[r, sel] = self.head(self.backbone(images, ids, mask).pooled).rank.float().cpu()
        if self.trainer.world_size > 1:
            parts: list[Tensor] = [None] * self.trainer.world_size  # type: ignore[list-item]
            torch.distributed.all_gather_object(parts, second)
            second = parts[0]
            for part in parts[1:]:  # each rank filled the rows of its own images
                second = torch.where(part.isnan(), second, part)
        return second

    def _finish_eval(self, stage: str) -> dict[str, float]:
        row_ids, scores = self._gather(stage)
        if row_ids.numel() == 0:
            return {}
        col_ids = self._texts(stage).image_ids
        if self.rerank is not None:
            second = self._rerank_scores(stage, scores, row_ids)
            metrics = rerank_recall(scores, second, row_ids, col_ids, self.rerank.top_k)
            first = recall_at_k(scores, row_ids, col_ids)
            metrics.update({f"first_pass/{k}": v for k, v in first.items()})
        else:
            metrics = recall_at_k(scores, row_ids, col_ids)
        self.last_scores[stage] = {"image_ids": row_ids, "scores": scores}
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "ir_r1" and stage == "val", sync_dist=True)
        return metrics

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")
        self.skip_report.end("val", self.data_facts, self)

    def on_test_epoch_end(self) -> None:
        metrics = self._finish_eval("test")
        skipped = self.skip_report.end("test", self.data_facts, self)
        directory = self.output_dir("predictions")  # every rank: log_dir is a collective under DDP
        if metrics and self.trainer.is_global_zero:
            path = self._write_ranks("test", directory)
            self.write_skip_summary(path, "test", int(self.last_scores["test"]["image_ids"].numel()), skipped)
        self.skip_report.log_totals(self.data_facts, self)

    def on_predict_epoch_end(self) -> None:
        self._gather_and_write("predict")

    def _gather_and_write(self, stage: str) -> None:
        skipped = self.skip_report.end(stage, self.data_facts, self)
        row_ids, scores = self._gather(stage)
        directory = self.output_dir("predictions")
        if row_ids.numel() and self.trainer.is_global_zero:
            self.last_scores[stage] = {"image_ids": row_ids, "scores": scores}
            path = self._write_ranks(stage, directory)
            self.write_skip_summary(path, stage, int(row_ids.numel()), skipped)

    def _write_ranks(self, stage: str, directory: Path, k: int = 10) -> Path:
        """``retrieval_<stage>_ranks.json``: each image's top-k caption ids and each caption's top-k image ids."""
        data = self.last_scores[stage]
        row_ids, scores = data["image_ids"], data["scores"]
        texts = self._texts(stage)
        top_texts = scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()
        top_images = scores.topk(min(k, scores.shape[0]), dim=0).indices.T.tolist()
        out = {
            "text_retrieval": {
                str(int(i)): [texts.text_ids[c] for c in cols] for i, cols in zip(row_ids.tolist(), top_texts)
            },
            "image_retrieval": {
                texts.text_ids[c]: [int(row_ids[r]) for r in rows] for c, rows in enumerate(top_images)
            },
        }
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"retrieval_{stage}_ranks.json"
        path.write_text(json.dumps(out))
        self.predictions_path = path
        return path
