"""Helpers shared by the test packages (pytest puts tests/ on the path through tests/conftest.py): the
experiment files and the arguments of a tiny run on the shapes world."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
BASE = EXPERIMENTS / "base.yaml"
DEMO = EXPERIMENTS / "shapes_vilt.yaml"

TASK_CLASS = {
    "nlvr2": "pumer_lightning.tasks.NLVR2Task",
    "vqa2": "pumer_lightning.tasks.VQATask",
    "snli_ve": "pumer_lightning.tasks.SNLIVETask",
    "retrieval": "pumer_lightning.tasks.RetrievalTask",
}
#: Answers of the shapes world's VQA (``pumer_lightning.data.shapes.VQA_ANSWERS``).
SHAPES_VQA_ANSWERS = 18


def run_args(
    task: str,
    preset: str,
    shapes: Path,
    out: Path,
    *extra: str,
    layers: str = "[1,2]",
) -> list[str]:
    """Arguments (after the subcommand) for a tiny run of ``task`` on the shapes world, logging to ``out``."""
    args = [
        "-c", str(BASE), "-c", str(DEMO),
        f"--model={TASK_CLASS[task]}",
        f"--data.task={task}",
        f"--data_root={shapes.parent}",
        f"--model.backbone.preset={preset}",
        "--model.backbone.checkpoint=null",  # random init (the demo fine-tunes from a pre-trained checkpoint)
        f"--model.backbone.tokenizer={shapes / 'tokenizer'}",
        f"--data.data_dir={shapes / task}",
        f"--model.reducer.layers={layers}",
        "--data.batch_size=8",
        "--data.eval_batch_size=8",
        "--data.num_workers=0",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--shapes=null",
    ]  # fmt: skip
    if task == "vqa2":
        args.append(f"--model.init_args.num_answers={SHAPES_VQA_ANSWERS}")
    if task == "retrieval":
        args += ["--model.init_args.num_negatives=3", "--model.init_args.pair_batch=64"]
    return args + list(extra)
