"""The names of PuMer's released fine-tuned checkpoints (csarron/PuMer, docs/experiments.md), by setting.

The settings themselves (schedules in real block ids, with the token counts of their inputs) are
`pumer_lightning.reduce.released.RELEASED`, under the same keys; each name spells its setting: ``p`` the prune
ratio (1 - keep), ``r`` the image merge ratio, ``t`` the text merge ratio, then the official layer ids (doubled
for METER, whose co-attention blocks count twice).
"""

from __future__ import annotations

RELEASED_CHECKPOINTS: dict[str, str] = {
    "vilt_vqa2": "vilt-vqa2-p0.1-r0.3-t0.2-258",
    "vilt_snli_ve": "vilt-ve-p0.1r0.3t0.2-2468",
    "vilt_nlvr2": "vilt-nlvr2-p0.1r0.3t0.2-258",
    "meter_vqa2": "meter-vqa2-p0.2r0.2t0.2-0246",
    "meter_snli_ve": "meter-ve-p0.3r0.5t0.2-0246",
    "meter_nlvr2": "meter-nlvr2-p0.3r0.5t0.2-246",
}
