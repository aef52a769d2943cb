"""What a task step hands on: the `TokenTally` of its backbone passes, and the `StepOutput` callbacks read.

The path from batch to dashboard is one-way: ``compute_logits`` returns the logits with the tokens of its backbone
passes (`Scored`), the step returns them (`StepOutput`), the callbacks read them as Lightning's ``outputs`` in
``on_*_batch_end`` (`step_tokens`); nothing is written on the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypedDict

from torch import Tensor

from pumer_lightning.reduce import ReductionTrace

#: The stages that keep metrics (prediction only writes rows).
STAGES: tuple[str, ...] = ("train", "val", "test")


def stage_key(stage: str) -> str:
    """Key of a stage's metric in an `nn.ModuleDict` (``train`` itself would clash with ``Module.train``)."""
    return f"{stage}_"


@dataclass
class TokenTally:
    """Tokens the backbone processed in one step: sums over the rows (image-text pairs) of every pass.

    ``image[i]`` / ``text[i]``: image / text tokens entering layer ``i``, summed over rows; ``rows``: image-text
    pairs that went through the backbone (NLVR2: two per example; retrieval: every scored pair).
    ``examples``: the units throughput counts: the batch's task examples, except in retrieval evaluation, where
    one example is one scored image-text pair (``examples == rows``). Plain Python numbers only (no tensors).
    """

    examples: int = 0
    rows: int = 0
    image: list[float] = field(default_factory=list)
    text: list[float] = field(default_factory=list)

    def add(self, trace: ReductionTrace, rows: int) -> None:
        if not self.image:
            self.image = [0.0] * len(trace.image_tokens)
            self.text = [0.0] * len(trace.text_tokens)
        for i, (n_img, n_txt) in enumerate(zip(trace.image_tokens, trace.text_tokens)):
            self.image[i] += n_img * rows
            self.text[i] += n_txt * rows
        self.rows += rows

    def merge(self, other: TokenTally) -> None:
        if not other.rows:
            self.examples += other.examples
            return
        if not self.image:
            self.image = [0.0] * len(other.image)
            self.text = [0.0] * len(other.text)
        self.image = [a + b for a, b in zip(self.image, other.image)]
        self.text = [a + b for a, b in zip(self.text, other.text)]
        self.rows += other.rows
        self.examples += other.examples

    def mean_image(self) -> list[float]:
        return [v / self.rows for v in self.image] if self.rows else []

    def mean_text(self) -> list[float]:
        return [v / self.rows for v in self.text] if self.rows else []

    @property
    def input_tokens(self) -> float:
        """Tokens entering the first layer, summed over rows (what tokens/s counts)."""
        return (self.image[0] + self.text[0]) if self.image else 0.0


class Scored(NamedTuple):
    """What `VLTask.compute_logits` returns: the logits and the tokens its backbone passes processed."""

    logits: Any
    tokens: TokenTally


class StepOutput(TypedDict, total=False):
    """What ``training_step``, ``validation_step`` and ``test_step`` return; callbacks receive it as ``outputs``
    in ``on_train_batch_end`` / ``on_validation_batch_end`` / ``on_test_batch_end``.

    ``loss``: the step's loss (what training back-propagates; absent or None for an unlabelled batch).
    ``tokens``: the tokens the model's own backbone processed in the step (a teacher's passes are not counted),
    with ``examples`` set.
    """

    loss: Tensor | None
    tokens: TokenTally


def step_tokens(outputs: Any) -> TokenTally:
    """The `TokenTally` of a step's ``outputs`` (a `StepOutput`); a clear error for a module returning none."""
    tokens = outputs.get("tokens") if isinstance(outputs, dict) else None
    if not isinstance(tokens, TokenTally):
        raise TypeError(
            "the step returned no token tally: the module's training/validation/test step must return a "
            f"StepOutput dict with a 'tokens' TokenTally (pumer_lightning.tasks.VLTask does), got "
            f"{type(outputs).__name__}"
        )
    return tokens
