"""The settings the study evaluates: the training-free rows on the baseline's weights (PuMer, its ablations, the
keep sweep, the pruning control by placement) and the fine-tuned rows with their controls."""

from __future__ import annotations

import dataclasses
from typing import Any

from pumer_lightning.reduce import ABLATIONS, ReducerSchedule, ablation

from .config import StudyConfig
from .train import Arms

Setting = tuple[str, ReducerSchedule | None]  # (description, reducer at test)


def free_settings(cfg: StudyConfig, chosen: str, num_layers: int) -> dict[str, Setting]:
    """The training-free settings evaluated on the baseline's weights (a backbone of ``num_layers`` reducible
    blocks), in report order. Rows named after an ablation are `pumer_lightning.reduce.ablation` of the PuMer
    setting (``ABLATIONS`` says what each means)."""
    pumer, plain = cfg.schedule(text_merge_policy=chosen), cfg.schedule()
    free: dict[str, Setting] = {"baseline": ("no reduction", None)}
    for p in cfg.policies:
        desc = f"PuMer, text-merge policy {p}" + (" (chosen)" if p == chosen else "")
        free[f"pumer_{p}"] = (desc, cfg.schedule(text_merge_policy=p))
    if "pads_first" in cfg.policies and cfg.text_padding != "longest":
        free["pumer_pads_first_longest"] = (
            "PuMer, pads_first, batches padded to their longest text",
            cfg.schedule(text_merge_policy="pads_first"),
        )
    free["pumer_no_text"] = ("PuMer without text merging", ablation(plain, "no_text_merge"))
    free["pumer_score_partition"] = (
        "PuMer, bipartite A/B split in score order (official code)",
        dataclasses.replace(pumer, partition="score"),
    )
    # prune_only merges no text: built from the "real" policy's schedule (the one it always had; same tokens)
    ablated = {"prune_only": plain, "no_prune": pumer, "random_prune": pumer, "cls_prune": pumer}
    for name, of in ablated.items():
        free[name] = (ABLATIONS[name][0], ablation(of, name))
    free.update(keep_sweep(cfg, pumer))
    if cfg.placement_keep is not None:
        free.update(placement(pumer, cfg.placement_keep, num_layers))
    return free


def keep_sweep(cfg: StudyConfig, pumer: ReducerSchedule) -> dict[str, Setting]:
    """PuMer and random pruning at every keep ratio of ``cfg.keep_sweep`` (but PuMer's own), and at keep 0.5
    without text merging."""
    out: dict[str, Setting] = {}
    for k in cfg.keep_sweep:
        if k != pumer.keep_ratio:
            at_k = dataclasses.replace(pumer, keep_ratio=k)
            out[f"keep_{k:g}"] = (f"PuMer at keep {k:g}", at_k)
            out[f"random_keep_{k:g}"] = (f"random pruning at keep {k:g}", ablation(at_k, "random_prune"))
    if 0.5 in cfg.keep_sweep and pumer.keep_ratio != 0.5:
        no_text = ablation(cfg.schedule(keep_ratio=0.5), "no_text_merge")
        out["keep_0.5_no_text"] = ("PuMer at keep 0.5 without text merging", no_text)
        out["random_keep_0.5_no_text"] = (
            "random pruning at keep 0.5 without text merging",
            ablation(no_text, "random_prune"),
        )
    return out


def placement(pumer: ReducerSchedule, keep: float, num_layers: int) -> dict[str, Setting]:
    """The pruning control by placement: text-informed and random pruning at ``keep`` with the reducer at one
    block only, for every block but the last."""
    out: dict[str, Setting] = {}
    for block in range(num_layers - 1):
        at = dataclasses.replace(pumer, keep_ratio=keep, layers=[block])
        out[f"keep_{keep:g}@block{block}"] = (f"PuMer at keep {keep:g}, reducer at block {block} only", at)
        out[f"random_keep_{keep:g}@block{block}"] = (
            f"random pruning at keep {keep:g}, reducer at block {block} only",
            ablation(at, "random_prune"),
        )
    return out


def finetuned_settings(cfg: StudyConfig, arms: Arms, chosen: str) -> dict[str, tuple[str, Setting]]:
    """The fine-tuned rows, each evaluated with the reducer it was trained with, and their controls:
    name -> (weights, (description, reducer at test))."""
    pumer, ch, on = cfg.schedule(text_merge_policy=chosen), f"ft_pumer_{chosen}", "fine-tuned with PuMer on"
    rows: dict[str, tuple[str, Setting]] = {}
    for p in cfg.policies:
        desc = f"{on}, text-merge policy {p}" + (" (chosen)" if p == chosen else "")
        rows[f"ft_pumer_{p}"] = (f"ft_pumer_{p}", (desc, arms.schedules[f"ft_pumer_{p}"]))
    no_text = (f"{on}, without text merging", arms.schedules["ft_pumer_no_text"])
    rows["ft_pumer_no_text"] = ("ft_pumer_no_text", no_text)
    rows["ft_control"] = ("ft_control", ("fine-tuned with reducers off (matched control)", None))
    rows["ft_control:eval_pumer"] = (
        "ft_control",
        ("matched control evaluated with PuMer (chosen policy): reduced without training for it", pumer),
    )
    rows[f"{ch}:eval_off"] = (ch, (f"{on} (chosen policy), evaluated with reducers off", None))
    random = ablation(pumer, "random_prune")
    rows[f"{ch}:eval_random"] = (
        ch,
        (f"{on} (chosen policy), evaluated with random pruning at the same budget", random),
    )
    if cfg.distil_seeds:
        distil = f"{on} (chosen policy) + distillation from the baseline"
        rows["ft_pumer_distil"] = ("ft_pumer_distil", (distil, pumer))
    return rows


def row(name: str, stage: str, weights: str, setting: Setting) -> dict[str, Any]:
    """A setting's row of the report (``eval_reducer``: its reducer at test, dropped before the record)."""
    desc, sched = setting
    return {
        "name": name,
        "stage": stage,
        "weights": weights,
        "description": desc,
        "schedule": str(sched or ReducerSchedule()),
        "eval_reducer": sched,
    }
