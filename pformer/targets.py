"""The stage-2 alignment targets: P(y) of every caption, computed once by the frozen P-Former and cached on disk."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from dvlp_common.cache import KeyedArrayCache, file_digest, fingerprint

from .evaluation import prompts_for
from .model import CONFIG_NAME, WEIGHTS_NAME, PFormer, load_pformer_tokenizer


def pformer_fingerprint(pformer_dir: str | Path) -> str:
    """Identity of a saved P-Former: its weights and config files."""
    pformer_dir = Path(pformer_dir)
    return fingerprint("pformer", file_digest(pformer_dir / WEIGHTS_NAME), file_digest(pformer_dir / CONFIG_NAME))


def prompt_target_cache(pformer_dir: str | Path, captions: Sequence[str], cache_root: str | Path,
                        device: str | torch.device = "cpu", batch_size: int = 64,
                        dtype: torch.dtype | None = None) -> KeyedArrayCache:
    """P(y) [n, d_llm] for every caption, computed once with the frozen P-Former at ``pformer_dir``."""
    producer = fingerprint(pformer_fingerprint(pformer_dir), str(dtype))  # bf16 targets differ from fp32 ones
    state: dict = {}

    def compute(chunk: list[str]) -> torch.Tensor:
        if not state:  # load the P-Former only when something must be computed
            state["model"] = PFormer.from_pretrained(pformer_dir).to(device).eval()
            state["tok"] = load_pformer_tokenizer(pformer_dir)
        return prompts_for(state["model"], state["tok"], chunk, device, dtype)

    return KeyedArrayCache.open_or_build(Path(cache_root) / "prompt_targets", producer,
                                         {"kind": "pformer_prompts", "pformer_dir": str(pformer_dir)},
                                         captions, compute, batch_size=batch_size)


__all__ = ["pformer_fingerprint", "prompt_target_cache"]
