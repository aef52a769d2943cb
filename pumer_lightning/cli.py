"""The command line: ``python -m pumer_lightning {fit,validate,test,predict} -c experiments/base.yaml -c ...``.

`PumerCLI` is LightningCLI with

* any task module as ``model`` (``class_path: pumer_lightning.tasks.NLVR2Task``) and `VLDataModule` as ``data``;
* OmegaConf interpolation that sees command-line overrides (parser mode ``omegaconf+`` with relative paths, the
  combination that works with jsonargparse 4.53: docs/cli.md#configuration-files-and-interpolation), e.g.
  ``${data_root}`` in YAML;
* a top-level ``data_root`` (default ``data``) and ``exp_name`` that the YAML files interpolate;
* settings that follow from the backbone linked instead of repeated: ``data.tokenizer``, ``data.image_size``,
  ``data.image_mean``, ``data.image_std`` and ``data.resize`` come from ``model.backbone`` (the text vocabulary
  size follows the backbone's tokenizer inside the model);
* the resolved configuration saved as ``config.yaml`` in every run's log directory (also under
  ``fast_dev_run``, which Lightning's own callback skips);
* ``validate/test/predict --ckpt_path X`` evaluates X's weights under the configuration given on the command
  line, so a reducer override at test time takes effect (training-free PuMer on a fine-tuned model);
* ``fit --ckpt_path=last`` resumes the newest ``interrupted.ckpt`` / ``last.ckpt`` of the experiment in its own
  run directory, or stops saying there is none; a fit without ``--ckpt_path`` never resumes, and refuses a run
  directory that already holds checkpoints (`pumer_lightning.callbacks.checkpoint`); a fit locks its run directory
  (`RunDirectoryLock`), so a second fit into it stops naming the holder;
* a checkpoint the model cannot use (e.g. a distillation teacher of another architecture) stops with its own
  message, not a traceback;
* SIGTERM ends a fit with exit status 143 and the file and command to resume with; a checkpoint that cannot be
  written (disk full) ends it with one message naming the file;
* reducer settings checked right after parsing (``--model.reducer.keep_ratio must be in (0, 1], got 1.5``), and
  unreadable checkpoint files and tokenizer directories reported before anything is built.
"""

from __future__ import annotations

import pumer_lightning.env  # noqa: F401  (first: offline hubs and the environment, before torch loads)

# isort: split
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pumer_lightning.callbacks.checkpoint import (
    SIGTERM_EXIT_CODE,
    CheckpointWriteError,
    interruption_report,
    refuse_to_overwrite,
    resolve_resume,
    run_directories,
)
from pumer_lightning.data import VLDataModule, backbone_image_config
from pumer_lightning.data.shapes import ShapesSpec, World, generate, is_current
from pumer_lightning.models import PRESETS, preset_depth, preset_family, preset_image_size
from pumer_lightning.models.checkpoint import CheckpointError, checkpoint_problem, unreadable_reason
from pumer_lightning.reduce import ReducerSchedule
from pumer_lightning.run_lock import RunDirectoryLock
from pumer_lightning.tasks import VLTask

#: The experiment files shipped with the project (``experiments/<name>.yaml``).
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


def backbone_image_settings(preset: str) -> dict[str, Any]:
    """Image size, mean, std and resize rule of a backbone preset (what its vision tower was trained with)."""
    family = preset_family(preset)
    config = backbone_image_config("clip" if family == "meter" else "vilt", preset_image_size(preset))
    return {
        "image_size": config.image_size,
        "mean": tuple(config.mean),
        "std": tuple(config.std),
        "resize": config.resize,
    }


def _image_size(backbone: Any) -> int:
    return backbone_image_settings(_preset(backbone))["image_size"]


def _image_mean(backbone: Any) -> tuple[float, float, float]:
    return backbone_image_settings(_preset(backbone))["mean"]


def _image_std(backbone: Any) -> tuple[float, float, float]:
    return backbone_image_settings(_preset(backbone))["std"]


def _resize(backbone: Any) -> str:
    return backbone_image_settings(_preset(backbone))["resize"]


def _preset(backbone: Any) -> str:
    return backbone["preset"] if isinstance(backbone, dict) else backbone.preset


def model_tokenizer(model: Any) -> str | None:
    """The tokenizer directory of an instantiated task module (``model.backbone.tokenizer``)."""
    return model.spec.tokenizer


@dataclass
class ShapesData:
    """The synthetic shapes world to generate before the run if it is missing or was made with other settings
    (`pumer_lightning.data.ensure_shapes`; same as ``python -m pumer_lightning.data.shapes``).

    Args:
        root: output root; task ``t`` lands in ``<root>/t/{train,val,test}`` and the tokenizer in
            ``<root>/tokenizer``.
        tasks: which tasks to generate.
        num_train: training examples (texts) per task.
        num_val: validation examples per task.
        num_test: test examples per task.
        image_size: image side in pixels.
        patch_size: grid cell side (set it to the backbone's patch size: one object per patch token).
        object_cells: object side in grid cells.
        min_objects: fewest objects per scene.
        max_objects: most objects per scene.
        noise: standard deviation of the background pixel noise.
        types: statement types to generate (None: all of each task's types).
        seed: generation seed.
        workers: generator processes (default: CPU count, at most 8).
    """

    root: str = "data/shapes"
    tasks: list[str] = field(default_factory=lambda: ["nlvr2", "vqa2", "snli_ve", "retrieval"])
    num_train: int = 2000
    num_val: int = 500
    num_test: int = 500
    image_size: int = 384
    patch_size: int = 32
    object_cells: int = 1
    min_objects: int = 3
    max_objects: int = 6
    noise: float = 8.0
    types: list[str] | None = None
    seed: int = 0
    workers: int | None = None

    def spec(self):
        """The generator's `ShapesSpec` for these settings."""
        return ShapesSpec(
            seed=self.seed,
            num_train=self.num_train,
            num_val=self.num_val,
            num_test=self.num_test,
            tasks=tuple(self.tasks),
            world=World.of(self),
            types=tuple(self.types) if self.types else None,
        )

    def ensure(self) -> Path:
        """Generate the data under ``root`` unless the same data are already there; returns ``root``."""
        spec = self.spec()
        if is_current(self.root, spec):
            return Path(self.root)
        print(f"generating the shapes world in {self.root} (once; later runs reuse it)", flush=True)
        return generate(spec, self.root, workers=self.workers)


_PREPARE = {"nlvr2": "nlvr2", "vqa2": "vqa2", "snli_ve": "snli_ve", "retrieval": "flickr30k|coco"}
#: Files of which a saved tokenizer directory holds at least one (fast tokenizer, BERT / RoBERTa vocabularies,
#: sentencepiece models).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_TOKENIZER_SOURCES = {"vilt": "bert-base-uncased", "meter": "roberta-base"}


def missing_inputs(config: Any) -> list[str]:
    """Every input file or directory a configuration names but the disk lacks, each with the command that
    makes it. Checked before anything is built, so a real experiment on a fresh machine stops at once."""
    problems = []
    data = config.get("data") or {}
    model = (config.get("model") or {}).get("init_args") or {}
    backbone = model.get("backbone") or {}
    task = data.get("task")
    data_dir = data.get("data_dir")
    if data_dir and not Path(data_dir).is_dir():
        dataset = _PREPARE.get(task, "<dataset>")
        problems.append(
            f"data.data_dir {data_dir} does not exist; convert the official {task} files with: "
            f"python -m pumer_lightning.data.prepare {dataset} --src <downloaded files> --out {data_dir}"
        )
    tokenizer = backbone.get("tokenizer")
    preset = backbone.get("preset")
    family = preset_family(preset) if preset else None
    if tokenizer and tokenizer not in ("None", "null"):
        source = _TOKENIZER_SOURCES.get(family, "<tokenizer>")
        save = (
            f'save the {source} tokenizer there once, on a machine with internet: python -c "from transformers '
            f"import AutoTokenizer; AutoTokenizer.from_pretrained('{source}').save_pretrained('{tokenizer}')\""
        )
        if not Path(tokenizer).is_dir():
            problems.append(f"model.backbone.tokenizer {tokenizer} does not exist; {save}")
        elif not any((Path(tokenizer) / name).is_file() for name in TOKENIZER_FILES):
            problems.append(
                f"model.backbone.tokenizer {tokenizer} holds no tokenizer files (none of "
                f"{', '.join(TOKENIZER_FILES)}); {save}"
            )
    checkpoint = backbone.get("checkpoint")
    if checkpoint in ("None", "null"):  # see BackboneSpec.__post_init__
        checkpoint = None
    if checkpoint and not Path(checkpoint).exists():
        problems.append(
            f"model.backbone.checkpoint {checkpoint} does not exist; convert the original {family} weights with: "
            f"python -m pumer_lightning.models.convert {family} <original .ckpt> {checkpoint}"
        )
    distill = model.get("distill") or {}
    teacher = distill.get("teacher") if distill else None
    if teacher and teacher != "initial" and not Path(teacher).exists():
        problems.append(
            f"model.distill.teacher {teacher} does not exist; fine-tune the unreduced model first "
            "(same experiment with --model.reducer.layers=[]) and point this at its best checkpoint"
        )
    return problems


def unreadable_inputs(config: Any) -> list[str]:
    """Input checkpoints that exist but cannot be read (empty, truncated, corrupt, random bytes), each naming
    its file; ``--ckpt_path`` included. Checked before anything is built, like `missing_inputs`."""
    problems = []
    model = (config.get("model") or {}).get("init_args") or {}
    checkpoint = (model.get("backbone") or {}).get("checkpoint")
    if checkpoint and checkpoint not in ("None", "null") and Path(checkpoint).exists():
        problem = checkpoint_problem(checkpoint)
        if problem:
            problems.append(f"model.backbone.checkpoint: {problem}")
    distill = model.get("distill") or {}
    teacher = distill.get("teacher") if distill else None
    if teacher and teacher != "initial" and Path(teacher).exists():
        problem = checkpoint_problem(teacher) if Path(teacher).is_dir() else None
        reason = unreadable_reason(teacher) if Path(teacher).is_file() else None
        if problem or reason:
            problems.append(f"model.distill.teacher: {problem or f'{teacher} is unreadable: {reason}'}")
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and str(ckpt_path) not in ("last", "auto", "best", "hpc") and "://" not in str(ckpt_path):
        if not Path(ckpt_path).exists():
            problems.append(f"--ckpt_path {ckpt_path} does not exist")
        elif Path(ckpt_path).is_file():
            reason = unreadable_reason(ckpt_path)
            if reason:
                problems.append(f"--ckpt_path {ckpt_path} is unreadable: {reason}")
    return problems


#: Where a ReducerSchedule sits in a task's arguments, and the flag that sets it.
_SCHEDULES = (("reducer",), ("rerank", "first_pass"))


def _preset_depth(preset: str) -> int | None:
    """Reducible blocks of a backbone preset (`preset_depth`), or None for an unknown name (reported by its own
    check)."""
    return preset_depth(preset) if preset in PRESETS else None


def _as_dict(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else value


def reducer_errors(config: Any) -> list[str]:
    """One sentence per invalid reducer schedule in a parsed configuration, naming the flag
    (``--model.reducer.keep_ratio must be in (0, 1], got 1.5``). The rules are `ReducerSchedule`'s own
    (``__post_init__`` and ``check_depth`` against the backbone preset's depth)."""
    model = _as_dict(config.get("model")) or {}
    init_args = _as_dict(model.get("init_args")) if isinstance(model, dict) else None
    if not isinstance(init_args, dict):
        return []
    backbone = _as_dict(init_args.get("backbone")) or {}
    preset = backbone.get("preset") if isinstance(backbone, dict) else None
    errors = []
    for keys in _SCHEDULES:
        value: Any = init_args
        for key in keys:
            value = _as_dict(value.get(key)) if isinstance(value, dict) else None
        if not isinstance(value, dict):
            continue
        flag = "--model." + ".".join(keys)
        try:
            schedule = ReducerSchedule(**value)
            depth = _preset_depth(preset) if preset else None
            if depth is not None:
                schedule.check_depth(depth, f"{preset} backbone")
        except (TypeError, ValueError) as err:
            message = re.sub(r"\bReducerSchedule\.(\w+)", rf"{flag}.\1", str(err))
            message = re.sub(
                r"ReducerSchedule\.__init__\(\) got an unexpected keyword argument ",
                f"{flag}: unknown field ",
                message,
            )
            errors.append(message if flag in message else f"{flag}: {message}")
    return errors


class SaveResolvedConfig(SaveConfigCallback):
    """Writes the resolved ``config.yaml`` to the run's log directory, ``fast_dev_run`` included."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir
        if log_dir is None:
            return
        if trainer.fast_dev_run and trainer.is_global_zero:
            # Lightning skips saving under fast_dev_run; a smoke run's config is still worth keeping.
            path = Path(log_dir) / self.config_filename
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(
                self.config, str(path), skip_none=False, overwrite=True, multifile=self.multifile
            )
            self.already_saved = True
            return
        super().setup(trainer, pl_module, stage)


class PumerCLI(LightningCLI):
    """LightningCLI for every task module on `VLDataModule` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        given = kwargs.get("args")
        #: the command line as given (for the resume command printed after an interruption)
        self.argv: list[str] = [str(a) for a in given] if isinstance(given, (list, tuple)) else sys.argv[1:]
        #: the lock on the run directory a fit writes (held from before the fit until it ends)
        self.run_lock: RunDirectoryLock | None = None
        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
        kwargs.setdefault("model_class", VLTask)
        kwargs.setdefault("datamodule_class", VLDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # the task modules own their optimiser
        kwargs.setdefault("save_config_callback", SaveResolvedConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        parser_kwargs.setdefault("default_env", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--data_root",
            type=str,
            default="data",
            help="root of every dataset, tokenizer and checkpoint path",
        )
        parser.add_argument(
            "--exp_name", type=str, default="pumer", help="experiment name (log directory name)"
        )
        parser.add_argument(
            "--shapes",
            type=ShapesData | None,
            default=None,
            help="generate the shapes world first (demo runs)",
        )
        backbone = "model.init_args.backbone"
        # the tokenizer path may hold ${data_root}-style interpolations, so it is linked once resolved, from the
        # instantiated model (a parse-time link would copy the unresolved relative interpolation)
        parser.link_arguments("model", "data.tokenizer", compute_fn=model_tokenizer, apply_on="instantiate")
        parser.link_arguments(backbone, "data.image_size", compute_fn=_image_size)
        parser.link_arguments(backbone, "data.image_mean", compute_fn=_image_mean)
        parser.link_arguments(backbone, "data.image_std", compute_fn=_image_std)
        parser.link_arguments(backbone, "data.resize", compute_fn=_resize)

    def _parse_ckpt_path(self) -> None:
        """Keep the command line's model configuration when ``--ckpt_path`` is given.

        LightningCLI would re-parse the checkpoint's saved hyper-parameters over the command line, so
        ``test --ckpt_path X --model.reducer.keep_ratio=0.5`` would silently evaluate the training schedule (the
        official code's B20: docs/official_code_differences.md#b20) and relative interpolations copied by
        links would break. Here the configuration
        files and overrides define the model and the checkpoint supplies the weights, loaded strictly: a
        checkpoint of another architecture fails with the mismatching keys.
        """

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        errors = reducer_errors(config)
        if errors:  # one sentence per bad value, before anything is built (no union-type noise)
            sys.stderr.write("".join(f"error: {e}\n" for e in errors))
            raise SystemExit(2)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        shapes = config.get("shapes")
        if shapes:
            ShapesData(**(shapes.as_dict() if hasattr(shapes, "as_dict") else dict(shapes))).ensure()
        problems = missing_inputs(config)
        if problems:
            raise SystemExit("cannot start: missing inputs\n  - " + "\n  - ".join(problems))
        problems = unreadable_inputs(config)
        if problems:
            raise SystemExit("cannot start: unreadable inputs\n  - " + "\n  - ".join(problems))

    def instantiate_classes(self) -> None:
        """Build the trainer, model and data; a checkpoint the model cannot use (a distillation teacher of another
        architecture, say) stops with its own message instead of the parser's traceback and union-type report."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = checkpoint_error_in(err)
            if cause is None:
                raise
            raise SystemExit(f"error: {cause}") from None

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        ckpt_path = kwargs.get("ckpt_path")
        if subcommand == "fit":
            kwargs["ckpt_path"] = resolve_resume(self.trainer, ckpt_path)
            if self.trainer.is_global_zero:  # before the overwrite check: a running fit is not an earlier run
                self.run_lock = RunDirectoryLock(run_directories(self.trainer)).acquire()
            if kwargs["ckpt_path"] is None:
                refuse_to_overwrite(self.trainer)
        elif ckpt_path == "auto":
            raise SystemExit(
                f"error: --ckpt_path=auto is for fit; {subcommand} needs a checkpoint file (or last)"
            )
        elif ckpt_path == "last":
            kwargs["ckpt_path"] = resolve_resume(self.trainer, ckpt_path, continue_run=False)
        return kwargs

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            self._run_and_report(subcommand)
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    def _run_and_report(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException as err:
            if subcommand != "fit":
                if self.trainer.is_global_zero:
                    print(f"{subcommand} interrupted by SIGTERM; rerun the same command", file=sys.stderr)
                raise SystemExit(SIGTERM_EXIT_CODE) from err
            self._report_interruption(err)
            raise SystemExit(SIGTERM_EXIT_CODE) from err
        except CheckpointWriteError as err:  # e.g. disk full: one message naming the file, no traceback
            resume = interruption_report(self.trainer, err)[1] if subcommand == "fit" else None
            hint = f"\nresume with: {self.resume_command(resume)}" if resume else ""
            raise SystemExit(f"error: {err}{hint}") from None
        except (
            CheckpointError
        ) as err:  # a checkpoint that does not fit the model: its own message is the report
            raise SystemExit(f"error: {err}") from None
        except BaseException as err:  # a crash or Ctrl-C: say where the state went, then the usual traceback
            if (
                subcommand == "fit" and self.trainer.state.fn == TrainerFn.FITTING
            ):  # not a refusal before the fit
                self._report_interruption(err, only_if_saved=True)
            raise

    def resume_command(self, ckpt_path: str) -> str:
        """The command that continues this fit from ``ckpt_path``."""
        return "python -m pumer_lightning " + shlex.join(
            [*without_ckpt_path(self.argv), f"--ckpt_path={ckpt_path}"]
        )

    def _report_interruption(self, err: BaseException, only_if_saved: bool = False) -> None:
        if not self.trainer.is_global_zero:
            return
        message, resume = interruption_report(self.trainer, err)
        if only_if_saved and resume is None:
            return
        lines = [message]
        if resume:
            lines.append(f"resume with: {self.resume_command(resume)}")
        print("\n".join(lines), file=sys.stderr, flush=True)


def checkpoint_error_in(err: BaseException) -> CheckpointError | None:
    """The `CheckpointError` that ``err`` is or was raised from (jsonargparse wraps errors raised while it
    instantiates a class), or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, CheckpointError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def without_ckpt_path(argv: list[str]) -> list[str]:
    """``argv`` without its ``--ckpt_path X`` / ``--ckpt_path=X`` arguments."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--ckpt_path", "--ckpt-path"):
            skip = True
        elif not arg.startswith(("--ckpt_path=", "--ckpt-path=")):
            out.append(arg)
    return out


def main(args: list[str] | None = None) -> PumerCLI:
    """Entry point of ``python -m pumer_lightning``."""
    return PumerCLI(args=args)
