"""``dvlp demo`` is the whole pipeline on the embedded easy-VQA default, run as one small ablation
(:mod:`pipelines.ablate` with ``configs/demo.yaml``):

stage 1 (P-Former) -> for each arm (BLIP-2 baseline, P-Former, caption-free control): stage 2a (Q-Former
representation) -> stage 2b (generative, with a quality-against-time curve) -> held-out captioning + zero-shot VQA
-> the table, the plots and a gallery of held-out captions. One seed and one pair count make it a smoke-scale
comparison; ``dvlp ablate`` runs the seeds and sweeps that can separate the arms. This module also builds the
offline presets and embedded data (``dvlp prepare``).
"""
from __future__ import annotations

from dvlp_common import zoo


def prepare() -> None:
    """Build the offline presets and the embedded datasets into the cache (idempotent)."""
    from vl_align.sources import EMBEDDED, embedded_files

    for name in zoo.PRESETS:
        print(f"{name}: {zoo.resolve(name)}", flush=True)
    for dataset in EMBEDDED:
        for key, path in embedded_files(dataset).items():
            print(f"{dataset} {key}: {path}", flush=True)
