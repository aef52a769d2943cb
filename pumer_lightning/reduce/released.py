"""The released PuMer settings (csarron/PuMer, docs/experiments.md) as schedules with real block ids.

    python -m pumer_lightning.reduce.released      # prints the token-count table of docs/reducer.md

Each entry carries the token counts of the task's inputs: image tokens including the image CLS (ViLT 384 px
with 32 px patches: 145; METER 288 px with 16 px patches: 325; 384 px: 577) and the padded text length the
official configs use (32 for VQA, 40 otherwise). The checkpoint names are
`pumer_lightning.models.released.RELEASED_CHECKPOINTS`, under the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedule import ReducerSchedule


@dataclass(frozen=True)
class ReleasedSetting:
    schedule: ReducerSchedule
    n_image: int
    n_text: int
    num_layers: int


RELEASED: dict[str, ReleasedSetting] = {
    "vilt_vqa2": ReleasedSetting(ReducerSchedule.from_pumer(0.1, 0.3, 0.2, [2, 5, 8]), 145, 32, 12),
    "vilt_snli_ve": ReleasedSetting(ReducerSchedule.from_pumer(0.1, 0.3, 0.2, [2, 4, 6, 8]), 145, 40, 12),
    "vilt_nlvr2": ReleasedSetting(ReducerSchedule.from_pumer(0.1, 0.3, 0.2, [2, 5, 8]), 145, 40, 12),
    "meter_vqa2": ReleasedSetting(
        ReducerSchedule.from_pumer(0.2, 0.2, 0.2, [0, 2, 4, 6], doubled=True), 577, 32, 6
    ),
    "meter_snli_ve": ReleasedSetting(
        ReducerSchedule.from_pumer(0.3, 0.5, 0.2, [0, 2, 4, 6], doubled=True), 577, 40, 6
    ),
    "meter_nlvr2": ReleasedSetting(
        ReducerSchedule.from_pumer(0.3, 0.5, 0.2, [2, 4, 6], doubled=True), 325, 40, 6
    ),
}


def markdown_table() -> str:
    rows = [
        "| setting | schedule (real block ids) | block | image in → pruned → merged | text in → out |",
        "|---|---|---|---|---|",
    ]
    for name, setting in RELEASED.items():
        s = setting.schedule
        label = str(s)
        for i, step in enumerate(s.plan(setting.n_image, setting.n_text)):
            first = (f"`{name}`", label) if i == 0 else ("", "")
            rows.append(
                f"| {first[0]} | {first[1]} | {step.layer} | {step.image_in} → {step.image_kept} → "
                f"{step.image_out} | {step.text_in} → {step.text_out} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
