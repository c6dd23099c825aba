"""scripts/scene_slots.py: slot accuracy of saved caption predictions, beside a constant caption's."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "scene_slots.py"


def test_scene_slots_reads_predictions_and_scores_the_constant_caption(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("scene_slots", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    refs = ["a large pink circle left of a small red star", "a large pink square above a small blue star",
            "a small gray cross left of a small red star"]
    preds = ["a large pink circle left of a small red star", "a large pink circle above a small red star", "?"]
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps({"captions": [{"prediction": p, "references": [r]} for p, r in zip(preds, refs)]}))
    assert module.main([str(path), "--labels", "run", "--out", str(tmp_path / "slots.json")]) == 0
    out = json.loads((tmp_path / "slots.json").read_text())
    assert out["run"]["exact"] == 1 / 3 and out["run"]["first shape"] == 1 / 3 and out["run"]["relation"] == 2 / 3
    constant = out["most common value per slot"]  # a large pink ... left of a small red star
    assert constant["first size"] == 2 / 3 and constant["first colour"] == 2 / 3 and constant["second shape"] == 1.0
    assert "| run | 3 |" in capsys.readouterr().out
