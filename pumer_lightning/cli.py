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
  line, so a reducer override at test time takes effect (training-free PuMer on a fine-tuned model).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from pumer_lightning.data import VLDataModule
from pumer_lightning.tasks import VLTask

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch 2.13 deprecates a pytree check Lightning 2.6 still uses; it says nothing about this project
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# With PreemptionCheckpoint (an OnExceptionCheckpoint) in the callbacks, Lightning turns every fit into
# fit(ckpt_path="last") and says so twice; a fresh run's version directory has nothing to resume, so both
# messages are noise. An explicit --ckpt_path still resumes as documented.
warnings.filterwarnings("ignore", message=r"`\.fit\(ckpt_path=None\)` was called without a model")
warnings.filterwarnings(
    "ignore", message=r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint'
)

#: The experiment files shipped with the project (``experiments/<name>.yaml``).
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


def backbone_image_settings(preset: str) -> dict[str, Any]:
    """Image size, mean, std and resize rule of a backbone preset (what its vision tower was trained with)."""
    from pumer_lightning.data import backbone_image_config
    from pumer_lightning.models import preset_family
    from pumer_lightning.models.build import preset_image_size

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
        from pumer_lightning.data.shapes import ShapesSpec, World

        world = World(
            image_size=self.image_size,
            patch_size=self.patch_size,
            object_cells=self.object_cells,
            min_objects=self.min_objects,
            max_objects=self.max_objects,
            noise=self.noise,
        )
        return ShapesSpec(
            seed=self.seed,
            num_train=self.num_train,
            num_val=self.num_val,
            num_test=self.num_test,
            tasks=tuple(self.tasks),
            world=world,
            types=tuple(self.types) if self.types else None,
        )

    def ensure(self) -> Path:
        """Generate the data under ``root`` unless the same data are already there; returns ``root``."""
        from pumer_lightning.data.shapes import generate, is_current

        spec = self.spec()
        if is_current(self.root, spec):
            return Path(self.root)
        print(f"generating the shapes world in {self.root} (once; later runs reuse it)", flush=True)
        return generate(spec, self.root, workers=self.workers)


_PREPARE = {"nlvr2": "nlvr2", "vqa2": "vqa2", "snli_ve": "snli_ve", "retrieval": "flickr30k|coco"}
_TOKENIZER_SOURCES = {"vilt": "bert-base-uncased", "meter": "roberta-base"}


def missing_inputs(config: Any) -> list[str]:
    """Every input file or directory a configuration names but the disk lacks, each with the command that
    makes it. Checked before anything is built, so a real experiment on a fresh machine stops at once."""
    from pumer_lightning.models import preset_family

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
    if tokenizer and not Path(tokenizer).is_dir():
        source = _TOKENIZER_SOURCES.get(family, "<tokenizer>")
        problems.append(
            f"model.backbone.tokenizer {tokenizer} does not exist; save the {source} tokenizer there once, on a "
            f'machine with internet: python -c "from transformers import AutoTokenizer; '
            f"AutoTokenizer.from_pretrained('{source}').save_pretrained('{tokenizer}')\""
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

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        shapes = config.get("shapes")
        if shapes:
            ShapesData(**(shapes.as_dict() if hasattr(shapes, "as_dict") else dict(shapes))).ensure()
        problems = missing_inputs(config)
        if problems:
            raise SystemExit("cannot start: missing inputs\n  - " + "\n  - ".join(problems))


def main(args: list[str] | None = None) -> PumerCLI:
    """Entry point of ``python -m pumer_lightning``."""
    return PumerCLI(args=args)
