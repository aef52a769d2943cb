"""The bench's plots: speedup against its FLOPs bound, the keep-ratio sweep, the training step, the batch sweep."""

from __future__ import annotations

from pathlib import Path


def plot_result(result: dict, path: Path, title: str) -> None:
    """Speedup against the FLOPs ratio for every setting, and the keep-ratio sweep."""
    plt = _pyplot()

    settings = result["settings"]
    training = "train_activation_mem_ratio" in settings[0]
    if training:
        fig, axes = plt.subplots(2, 2, figsize=(12, 9.6))
        (ax1, ax2), (ax3, ax4) = axes
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"baseline": "black", "released": "tab:red", "ablation": "tab:blue", "sweep": "tab:green"}
    _speedup_vs_bound(ax1, settings, "", colors)
    ax1.set_xlabel("FLOPs ratio (baseline / setting)")
    ax1.set_ylabel("speedup (examples/s over baseline)")
    ax1.set_title("speedup vs FLOPs bound (bars: paired range)")

    sweep = sorted(
        (s for s in settings if s["kind"] in ("sweep", "released")), key=lambda s: s["schedule"]["keep_ratio"]
    )
    if len(sweep) >= 2:
        keeps = [s["schedule"]["keep_ratio"] for s in sweep]
        ax2.plot(keeps, [s["speedup"] for s in sweep], "o-", color="tab:green", label="speedup")
        ax2.plot(keeps, [s["flops_ratio"] for s in sweep], "s--", color="tab:purple", label="FLOPs ratio")
        for s, k in zip(sweep, keeps):
            if s["kind"] == "released":
                ax2.annotate(
                    "released", (k, s["speedup"]), textcoords="offset points", xytext=(5, 5), fontsize=8
                )
        ref = sweep[0]["schedule"]
        ax2.set_title(f"keep-ratio sweep (merge {ref['merge_ratio']:g}, text {ref['text_merge_ratio']:g})")
        ax2.legend(fontsize=8)
    else:
        ax2.text(
            0.5, 0.5, "no keep-ratio sweep in this run", ha="center", va="center", transform=ax2.transAxes
        )
    ax2.axhline(1.0, color="grey", lw=1, ls=":")
    ax2.set_xlabel("keep ratio (1 - p)")
    ax2.set_ylabel("× baseline")
    ax2.grid(alpha=0.3)
    if training:
        _plot_training(settings, ax3, ax4, colors)
    fig.suptitle(f"{result['name']}: {title}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_training(settings: list[dict], ax3, ax4, colors: dict) -> None:
    """Training step: speedup against the forward + backward FLOPs ratio; activation memory against its bound."""
    timed = [s for s in settings if "train_speedup" in s and s.get("train_flops_ratio")]
    _speedup_vs_bound(ax3, timed, "train_", colors)
    ax3.set_xlabel("FLOPs ratio of forward + backward (baseline / setting)")
    ax3.set_ylabel("training-step speedup (forward + backward + AdamW)")
    ax3.set_title("training step: speedup vs FLOPs bound (bars: paired range)")

    names = [s["name"] for s in settings]
    x = list(range(len(settings)))
    ax4.bar(
        [i - 0.2 for i in x], [s["train_activation_mem_ratio"] for s in settings], width=0.4, label="measured"
    )
    ax4.bar(
        [i + 0.2 for i in x],
        [s["train_activation_mem_bound"] for s in settings],
        width=0.4,
        color="none",
        edgecolor="tab:purple",
        hatch="//",
        label="bound (memory proportional to tokens)",
    )
    ax4.axhline(1.0, color="grey", lw=1, ls=":")
    ax4.set_xticks(x)
    ax4.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax4.set_ylabel("training activation memory / baseline")
    ax4.set_title("training step: activation memory (forward + backward) vs its bound")
    ax4.legend(fontsize=8)
    ax4.grid(alpha=0.3, axis="y")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _speedup_vs_bound(ax, settings: list[dict], prefix: str, colors: dict) -> None:
    """``<prefix>speedup`` of every setting against its ``<prefix>flops_ratio``, bars over the paired range, on
    the diagonal speedup = FLOPs ratio (ranges beyond the frame are clipped)."""
    values = [
        v for s in settings for v in (s[f"{prefix}flops_ratio"], s[f"{prefix}speedup"]) if v is not None
    ]
    low, top = min([*values, 1.0]) * 0.92, max([*values, 1.0]) * 1.12
    ax.plot([low, top], [low, top], color="grey", lw=1, ls="--", label="speedup = FLOPs ratio")
    for s in settings:
        x, y = s[f"{prefix}flops_ratio"], s[f"{prefix}speedup"]
        low_y, high_y = s[f"{prefix}paired_speedup_min"], s[f"{prefix}paired_speedup_max"]
        err = [[max(y - low_y, 0)], [max(high_y - y, 0)]]
        ax.errorbar(x, y, yerr=err, fmt="o", color=colors.get(s["kind"], "tab:gray"), capsize=3)
        ax.annotate(s["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlim(low, top)
    ax.set_ylim(low, top)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)


def plot_batch_sweep(
    by_setting: dict[str, dict[int, dict]], batches: list[int], title: str, path: Path
) -> None:
    """Throughput and speedup against batch size, one line per setting, with each reduced setting's FLOPs bound."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, by in by_setting.items():
        ax1.plot(batches, [by[b]["examples_per_s"] for b in batches], "o-", label=name)
        line = ax2.plot(batches, [by[b]["speedup"] for b in batches], "o-", label=name)[0]
        if name != "baseline":
            bound = [by[b]["flops_ratio"] for b in batches]
            ax2.plot(batches, bound, ls="--", lw=1, color=line.get_color(), label=f"{name} FLOPs bound")
    ax2.axhline(1.0, color="grey", lw=1, ls=":")
    for ax, label in ((ax1, "examples/s"), (ax2, "speedup over baseline")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
