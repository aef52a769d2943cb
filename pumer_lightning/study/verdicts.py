"""What the study concludes from its scores: the paired comparisons the report lists and the documented targets,
met or missed."""

from __future__ import annotations

from typing import Any

from pumer_lightning.lab.stats import paired_over_seeds

from .config import ARM_TEXT


class Comparer:
    """Paired differences between named settings (seed s against seed s where both sides are fine-tuned)."""

    def __init__(
        self,
        scores: dict[str, list[list[float]]],
        seeds: dict[str, list[int]],
        types: list[str],
        only: tuple[str, ...],
    ) -> None:
        self.scores, self.seeds, self.types, self.only = scores, seeds, types, only

    def __call__(self, a: str, b: str, what: str) -> dict[str, Any]:
        pa, pb = self.scores[a], self.scores[b]
        sa, sb = self.seeds.get(a), self.seeds.get(b)
        if sa is not None and sb is not None:  # two fine-tuned settings: seed s against seed s
            common = [x for x in sa if x in sb]
            pa, pb = [pa[sa.index(x)] for x in common], [pb[sb.index(x)] for x in common]
        return {"a": a, "b": b, "what": what, **paired_over_seeds(pa, pb, self.types, self.only)}


def finetuned_comparisons(cmp: Comparer, policies: list[str], chosen: str) -> dict[str, dict[str, Any]]:
    """The fine-tuned rows against the matched control (and against the control's weights reduced at test)."""
    ch = f"ft_pumer_{chosen}"
    out = {
        "pumer_ft_minus_control_ft": cmp(
            ch, "ft_control", f"headline: fine-tuned PuMer ({chosen}) vs control"
        )
    }
    for p in policies:
        out[f"pumer_ft_{p}_minus_control_ft"] = cmp(
            f"ft_pumer_{p}", "ft_control", f"fine-tuned PuMer ({p}) vs control"
        )
    out["pumer_ft_no_text_minus_control_ft"] = cmp(
        "ft_pumer_no_text", "ft_control", "fine-tuned PuMer without text merging vs control"
    )
    out["pumer_ft_minus_control_ft_eval_pumer"] = cmp(
        ch, "ft_control:eval_pumer", "fine-tuned PuMer vs the control's weights reduced by PuMer"
    )
    out["pumer_ft_eval_random_minus_pumer_ft"] = cmp(
        f"{ch}:eval_random", ch, "fine-tuned PuMer weights: random vs text-informed pruning"
    )
    return out


def free_comparisons(cmp: Comparer, policies: list[str], chosen: str) -> dict[str, dict[str, Any]]:
    """The training-free rows against the baseline, and random or CLS against text-informed pruning (and, where
    the report lists it, the distilled fine-tune against the control)."""
    scores, pumer = cmp.scores, f"pumer_{chosen}"
    out = {"pumer_free_minus_baseline": cmp(pumer, "baseline", f"training-free PuMer ({chosen}) vs baseline")}
    for p in policies:
        out[f"pumer_free_{p}_minus_baseline"] = cmp(
            f"pumer_{p}", "baseline", f"training-free PuMer ({p}) vs baseline"
        )
    if "ft_pumer_distil" in scores:
        out["pumer_distil_ft_minus_control_ft"] = cmp(
            "ft_pumer_distil", "ft_control", "fine-tuned PuMer + distillation vs control (matching seeds)"
        )
    if "pumer_pads_first_longest" in scores:
        out["pumer_free_pads_first_longest_minus_baseline"] = cmp(
            "pumer_pads_first_longest",
            "baseline",
            "training-free pads_first on batch-longest padding vs baseline",
        )
    out["pumer_free_no_text_minus_baseline"] = cmp(
        "pumer_no_text", "baseline", "training-free PuMer without text merging vs baseline"
    )
    out["random_free_minus_pumer_free"] = cmp("random_prune", pumer, "random vs text pruning, keep 0.7")
    out["cls_free_minus_pumer_free"] = cmp("cls_prune", pumer, "CLS vs text pruning, keep 0.7")
    return out


def keep_comparisons(cmp: Comparer, chosen: str) -> dict[str, dict[str, Any]]:
    """Random against text-informed pruning at keep 0.5 (with and without text merging), and by placement."""
    scores, out = cmp.scores, {}
    if "keep_0.5" in scores:
        out["random_keep0.5_minus_pumer_keep0.5"] = cmp(
            "random_keep_0.5", "keep_0.5", f"random vs text pruning at keep 0.5 (merge, text {chosen})"
        )
        out["random_keep0.5_minus_baseline"] = cmp(
            "random_keep_0.5", "baseline", "random keep 0.5 vs baseline"
        )
    if "keep_0.5_no_text" in scores:
        out["random_keep0.5_no_text_minus_pumer_keep0.5_no_text"] = cmp(
            "random_keep_0.5_no_text",
            "keep_0.5_no_text",
            "random vs text pruning at keep 0.5, no text merging",
        )
    for name in scores:  # the pruning control by placement (StudyConfig.placement_keep)
        if name.startswith("random_keep_") and "@block" in name:
            text, block = name.removeprefix("random_"), name.rpartition("@block")[2]
            keep = text.partition("@")[0].replace("_", " ")
            out[f"placement_block{block}_random_minus_text"] = cmp(
                name, text, f"random vs text pruning, {keep}, reducer at block {block} only"
            )
    return out


def comparisons(cmp: Comparer, policies: list[str], chosen: str) -> dict[str, dict[str, Any]]:
    """Every paired difference the report lists, in its order."""
    return {
        **finetuned_comparisons(cmp, policies, chosen),
        **free_comparisons(cmp, policies, chosen),
        **keep_comparisons(cmp, chosen),
    }


def targets(c: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The documented accuracy targets, met or missed, from the comparisons (points = 100 x accuracy)."""
    free, ft = c["pumer_free_minus_baseline"], c["pumer_ft_minus_control_ft"]
    out = {
        "training_free_loss_at_most_5": {
            "target": "training-free, the chosen policy loses <= 5 points against the baseline (learned types)",
            "value": 100 * free["diff"],
            "se": 100 * free["se"],
            "met": free["diff"] >= -0.05,
        },
        "finetuned_within_1_point": {
            "target": "fine-tuned PuMer vs matched control within 1 point, >= 3 seeds, seed-inclusive SE <= 0.7",
            "value": 100 * ft["diff"],
            "se": 100 * ft["se"],
            "seeds": ft["seeds"],
            "met": abs(ft["diff"]) <= 0.01 and ft["seeds"] >= 3 and ft["se"] <= 0.007,
        },
    }
    if "random_keep0.5_minus_pumer_keep0.5" in c:
        r = c["random_keep0.5_minus_pumer_keep0.5"]
        out["random_5_below_text_at_keep_0.5"] = {
            "target": "training-free at keep 0.5 (same merge and text settings), random pruning >= 5 points below "
            "text-informed pruning",
            "value": 100 * r["diff"],
            "se": 100 * r["se"],
            "met": r["diff"] <= -0.05,
        }
    return out


def arm_comparisons(cmp: Comparer, arms: list[str]) -> dict[str, dict[str, Any]]:
    """Every PuMer arm minus the baseline, seed s against seed s."""
    return {
        f"{name}_minus_baseline": cmp(f"arm:{name}", "arm:baseline", f"{ARM_TEXT[name]} vs the baseline")
        for name in arms
        if name != "baseline"
    }


def paper_targets(comps: dict[str, dict[str, Any]], arm: str) -> dict[str, dict[str, Any]]:
    """The documented targets (`pumer_lightning.study.verdicts.targets`), the fine-tuned one against the
    baseline arm: the chosen PuMer arm within 1 point of it."""
    out = targets({**comps, "pumer_ft_minus_control_ft": comps[f"{arm}_minus_baseline"]})
    out["finetuned_within_1_point"]["target"] = (
        f"the PuMer arm chosen on validation ({arm}) within 1 point of the baseline, both fine-tuned from the "
        "pre-trained checkpoint, >= 3 seeds, seed-inclusive SE <= 0.7"
    )
    return out
