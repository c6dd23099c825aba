"""What do generated scenes captions get right? Slot by slot of the template (issue 19).

``embedded:scenes`` captions follow one template, ``a <size> <colour> <shape> <relation> a <size> <colour> <shape>``.
CIDEr and exact match say how close a caption is; this says which parts it conveys: each object's size, colour and
shape, and their relation (``vl_align.scenes.slot_accuracy``). Reads the ``predictions.json`` that an evaluation or a
zero-shot run writes (``{"captions": [{"prediction", "references", ...}]}``), one or more, and prints a table with
the score of a constant caption built from each slot's most common value among the first file's references.

    python scripts/scene_slots.py RUN/zero_shot/predictions.json [more.json ...] [--labels a,b] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from dvlp_common.io import write_json_atomic
from dvlp_common.reports import markdown_table
from vl_align.scenes import caption_slots, slot_accuracy


def slots_of(predictions_file: str | Path) -> dict:
    rows = json.loads(Path(predictions_file).read_text())["captions"]
    result = slot_accuracy([r["prediction"] for r in rows], [r["references"][0] for r in rows])
    return {"captions": len(rows), **result}


def majority_of(predictions_file: str | Path) -> dict:
    """The reference point of a caption-blind captioner: every slot filled with its most common value among these
    references (what a constant caption would score)."""
    refs = [r["references"][0] for r in json.loads(Path(predictions_file).read_text())["captions"]]
    constant = [Counter(values).most_common(1)[0][0] for values in zip(*map(caption_slots, refs))]
    constant_caption = f"a {' '.join(constant[:3])} {constant[3]} a {' '.join(constant[4:])}"
    return {"captions": len(refs), **slot_accuracy([constant_caption] * len(refs), refs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+", help="predictions.json files")
    parser.add_argument("--labels", default=None, help="comma-separated names, one per file")
    parser.add_argument("--out", default=None, help="json file for the results")
    args = parser.parse_args(argv)
    names = args.labels.split(",") if args.labels else args.predictions
    if len(names) != len(args.predictions):
        parser.error(f"--labels names {len(names)} files, {len(args.predictions)} given")
    results = {name: slots_of(path) for name, path in zip(names, args.predictions)}
    results["most common value per slot"] = majority_of(args.predictions[0])
    print(markdown_table([{"run": name, **r} for name, r in results.items()], digits=2))
    if args.out:
        write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
