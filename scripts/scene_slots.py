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
from vl_align.scenes import SceneKey, SceneObject, caption_of, caption_slots, slot_accuracy


def slots_of(rows: list[dict]) -> dict:
    """Slot accuracy of a predictions.json's caption rows, each against its first reference."""
    return {"captions": len(rows),
            **slot_accuracy([r["prediction"] for r in rows], [r["references"][0] for r in rows])}


def majority_of(rows: list[dict]) -> dict:
    """The reference point of a caption-blind captioner: every slot filled with its most common value among these
    rows' references (what a constant caption would score)."""
    refs = [r["references"][0] for r in rows]
    value = [Counter(values).most_common(1)[0][0] for values in zip(*map(caption_slots, refs))]
    constant = caption_of(SceneKey(SceneObject(*value[:3]), value[3], SceneObject(*value[4:])))
    return slots_of([{"prediction": constant, "references": [ref]} for ref in refs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+", help="predictions.json files")
    parser.add_argument("--labels", default=None, help="comma-separated names, one per file")
    parser.add_argument("--out", default=None, help="json file for the results")
    args = parser.parse_args(argv)
    names = args.labels.split(",") if args.labels else args.predictions
    if len(names) != len(args.predictions):
        parser.error(f"--labels names {len(names)} files, {len(args.predictions)} given")
    rows = {name: json.loads(Path(path).read_text())["captions"] for name, path in zip(names, args.predictions)}
    results = {name: slots_of(r) for name, r in rows.items()}
    results["most common value per slot"] = majority_of(rows[names[0]])
    print(markdown_table([{"run": name, **r} for name, r in results.items()], digits=2))
    if args.out:
        write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
