"""P-Former: a BERT-like encoder whose [CLS] output becomes prompt vectors for a frozen LLM (arXiv 2307.07063).

    sentence ──tokenize──► encoder ──► c = h[CLS]            [B, d]
    c ──Linear(d, n·d)──► reshape [B, n, d] ──Linear(d, d)+tanh──► Linear(d, d_llm) ──► P(y)   [B, n, d_llm]
    c ──Linear(d, 256)──► normalise ──► z (contrastive embedding)

n (the number of prompts) is independent of the maximum text length, unlike the authors' code, which reshaped by
the text length.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dvlp_common import zoo
from dvlp_common.config import Config, ConfigError, build, param, to_dict
from dvlp_common.io import building_folder

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "pformer_config.json"


@dataclass
class PFormerConfig(Config):
    text_encoder: str = param("minilm-l6", help="BERT-like encoder: preset, HF name or local folder")
    llm: str = param("smollm2-135m", help="frozen LLM the prompts are for: preset, HF name or local folder")
    num_prompts: int = param(8, ge=1, help="n prompt vectors (32 in the paper)")
    max_text_length: int = param(32, ge=4, help="token limit of the encoder input and of the LLM target")
    mask_prob: float = param(0.25, ge=0.0, lt=1.0, help="fraction of non-pad, non-[CLS] tokens replaced by [MASK]")
    contrastive_dim: int = param(256, ge=1, help="width of the contrastive projection")
    temperature_init: float = param(0.07, gt=0.0, help="initial contrastive temperature (learnable)")
    label_smoothing: float = param(0.1, ge=0.0, lt=1.0, help="label smoothing of the contrastive loss")
    text_suffix: str = param("\n", help="appended to every LLM target; generation stops there")
    bos_before_prefix: bool = param(True, help="decoder-only LLMs: the tokenizer's BOS goes before the prompts (the "
                                               "LLM keeps its usual first token); false: prompts first, as BLIP-2")


class PFormer(nn.Module):
    def __init__(self, config: PFormerConfig, encoder: nn.Module, llm_hidden_size: int):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.llm_hidden_size = llm_hidden_size
        d, n = encoder.config.hidden_size, config.num_prompts
        self.expand = nn.Linear(d, n * d)
        self.mix = nn.Linear(d, d)
        self.to_llm = nn.Linear(d, llm_hidden_size)
        self.contrastive_proj = nn.Linear(d, config.contrastive_dim)
        # shape [1], not 0-d: DeepSpeed broadcasts parameters as byte views, which 0-d tensors cannot take
        self.temperature = nn.Parameter(torch.tensor([config.temperature_init]))

    @classmethod
    def build(cls, config: PFormerConfig, llm_hidden_size: int | None = None) -> "PFormer":
        """Pretrained encoder weights, new prompt head; the LLM's width is read from its config."""
        if llm_hidden_size is None:
            llm_config = zoo.load_config(config.llm)
            llm_hidden_size = getattr(llm_config, "hidden_size", None) or llm_config.d_model
        return cls(config, zoo.load_encoder(config.text_encoder), llm_hidden_size)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [CLS] output [B, d]."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    def prompts_from_cls(self, cls_out: torch.Tensor) -> torch.Tensor:
        """[B, d] -> P(y) [B, n, d_llm]."""
        b, d = cls_out.shape
        hidden = self.expand(cls_out).view(b, self.config.num_prompts, d)
        return self.to_llm(torch.tanh(self.mix(hidden)))

    def contrastive_embedding(self, cls_out: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.contrastive_proj(cls_out), dim=-1)

    def clamped_temperature(self) -> torch.Tensor:
        # as BLIP/BLIP-2: keep the learnable temperature in a sane range
        return self.temperature.clamp(0.001, 0.5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        cls_out = self.encode(input_ids, attention_mask)
        return {"prompts": self.prompts_from_cls(cls_out), "embedding": self.contrastive_embedding(cls_out),
                "temperature": self.clamped_temperature()}

    # ---- persistence: safetensors weights + our config + the encoder's config and tokenizer --------------------
    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Write the folder atomically: a crash part-way leaves the previous P-Former there, never none or half."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"pformer": to_dict(self.config), "llm_hidden_size": self.llm_hidden_size}
        with building_folder(directory) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
            self.encoder.config.save_pretrained(tmp / "encoder")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "tokenizer")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "PFormer":
        from transformers import AutoConfig, AutoModel

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a P-Former checkpoint: {CONFIG_NAME} is missing")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        config = build(PFormerConfig, meta["pformer"])
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(directory / "encoder"))
        model = cls(config, encoder, meta["llm_hidden_size"])
        missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=False)
        if missing or unexpected:
            raise ConfigError("", f"{directory / WEIGHTS_NAME} does not match the P-Former config: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model


def load_pformer_tokenizer(directory: str | Path):
    """The tokenizer saved beside a checkpoint, else the one of its configured text encoder."""
    directory = Path(directory)
    if (directory / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory / "tokenizer")
    meta = json.loads((directory / CONFIG_NAME).read_text())
    return zoo.load_tokenizer(meta["pformer"]["text_encoder"])


def read_pformer_config(directory: str | Path) -> PFormerConfig:
    """The config a saved P-Former was trained with, without loading its weights."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a P-Former checkpoint: {CONFIG_NAME} is missing")
    return build(PFormerConfig, json.loads(path.read_text())["pformer"], f"{path}: pformer")


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int, cls_token_id: int | None,
                prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace a fraction ``prob`` of the tokens that are neither padding nor [CLS] by [MASK] (a new tensor)."""
    if prob <= 0:
        return input_ids
    eligible = attention_mask.bool()
    if cls_token_id is not None:
        eligible &= input_ids != cls_token_id
    draw = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    return input_ids.masked_fill(eligible & (draw < prob), mask_token_id)


__all__ = ["PFormer", "PFormerConfig", "mask_tokens", "load_pformer_tokenizer"]
