"""The one report layout every evaluation writes: <name>.json (named sections of scores), <name>.md, predictions."""
from __future__ import annotations

import json

from dvlp_common.reports import write_report


def test_write_report_layout(tmp_path):
    result = {"trained": {"num_sentences": 2, "exact_match": 0.5}, "untrained": {"num_sentences": 2,
                                                                                  "exact_match": 0.0}}
    rows = [{"p_former": "untrained", "exact_match": 0.0}, {"p_former": "trained", "exact_match": 0.5}]
    preds = {"trained": [{"sentence": "a red circle", "regeneration": "a red circle"}]}
    write_report(tmp_path, "eval", result, rows, "Stage-1 reconstruction", preds)
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    assert json.loads((tmp_path / "predictions.json").read_text()) == preds
    md = (tmp_path / "eval.md").read_text()
    assert md.startswith("## Stage-1 reconstruction\n") and "| trained | 0.5000 |" in md

    write_report(tmp_path / "sub", "retrieval", {"itc": {"i2t_r1": 1.0}}, [{"ranking": "ITC", "i2t_r1": 1.0}],
                 "Retrieval", {"image_to_text": []}, note="ground truth by caption equality")
    assert (tmp_path / "sub" / "retrieval_predictions.json").is_file()
    assert (tmp_path / "sub" / "retrieval.md").read_text().rstrip().endswith("ground truth by caption equality")
