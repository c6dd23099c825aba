"""``dvlp``: the command line of every stage.

    dvlp stage1|stage2|generate-stage [--config FILE] [--resume] [key.sub=value ...]
    dvlp demo|ablate [--config FILE] [key.sub=value ...]
    dvlp prepare
    dvlp evaluate [--config FILE] front=RUN/generative/front output_dir=DIR [eval.key=value ...]
    dvlp export-hf [--config FILE] front=RUN/front output_dir=DIR [key.sub=value ...]

Overrides are ``key.sub=value`` words after the options; values are read as YAML (``optim.lr=3e-4``,
``logging.tensorboard=false``, ``optim.betas=[0.9,0.98]``). ``dvlp <stage> --help`` lists every key with its type
and default. A misspelt key is an error that names the closest valid key.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dvlp_common.config import ConfigError, describe, load_config

from .config import CONFIG_DIR

# subcommand -> (config class, runner, help, default YAML)
STAGES = {
    "stage1": ("pipelines.stage1:Stage1Config", "pipelines.stage1:run_stage1",
               "Stage 1: text-only P-Former pre-training and its evaluation", "stage1.yaml"),
    "stage2": ("pipelines.stage2:Stage2Config", "pipelines.stage2:run_stage2",
               "Stage 2a: representation learning (ITC+ITM+ITG + P-Former alignment), qformer or elip front",
               "stage2.yaml"),
    "generate-stage": ("pipelines.generative:GenerativeConfig", "pipelines.generative:run_generative",
                       "Stage 2b: generative learning (front -> LLM prefix), then caption/VQA evaluation",
                       "generative.yaml"),
}


# A YAML under configs/ belongs to the stage its file name starts with.
CONFIG_CLASSES = {"stage1": STAGES["stage1"][0], "stage2": STAGES["stage2"][0],
                  "generative": STAGES["generate-stage"][0], "demo": "pipelines.ablate:AblateConfig",
                  "ablate": "pipelines.ablate:AblateConfig", "evaluate": "pipelines.evaluate:EvaluateConfig"}


def _load(target: str):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)



def config_class_for(path: Path):
    for prefix, target in CONFIG_CLASSES.items():
        if Path(path).stem.startswith(prefix):
            return _load(target)
    raise ValueError(f"{path}: no stage owns this config; file names start with one of {', '.join(CONFIG_CLASSES)}")


def _keys_help(cls) -> str:
    lines = ["configuration keys (override with key.sub=value):"]
    for key, tp, default, help_text in describe(cls):
        lines.append(f"  {key} ({tp}, default {json.dumps(default)})" + (f": {help_text}" if help_text else ""))
    return "\n".join(lines)


def _stage_parser(sub, name: str, cls, help_text: str, default_config: str | None):
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=_keys_help(cls),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=CONFIG_DIR / default_config if default_config else None,
                   help=f"YAML config (default: configs/{default_config})")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many optimizer steps (testing "
                                                                "and time-boxed runs; resume later)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvlp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (config_cls, _, help_text, default_yaml) in STAGES.items():
        _stage_parser(sub, name, _load(config_cls), help_text, default_yaml)
    runners = {
        "demo": ("The whole pipeline on the embedded easy-VQA default: stage 1, then per arm (BLIP-2 baseline, "
                 "P-Former, caption-free control) stage 2a, stage 2b and the held-out evaluation; table, plots, "
                 "captions", "demo.yaml"),
        "ablate": ("Ablation against BLIP-2: stage 1 once, then arms x pairs x learning rates x seeds through "
                   "stages 2a/2b and evaluation; mean ± std, collapse rate, significance, plots", "ablate.yaml"),
        "evaluate": ("Held-out captioning and zero-shot VQA of a saved generative front (any kind), e.g. under "
                     "another generation protocol", "evaluate.yaml")}
    for name, (help_text, default_yaml) in runners.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=_keys_help(_load(CONFIG_CLASSES[name])),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", type=Path, default=CONFIG_DIR / default_yaml,
                       help=f"YAML (default: configs/{default_yaml})")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    sub.add_parser("prepare", help="build the offline model presets and the embedded data into the cache")
    export_help = "Export a trained Q-Former front as a transformers Blip2ForConditionalGeneration folder"
    p = sub.add_parser("export-hf", help=export_help, description=export_help,
                       epilog=_keys_help(_load("pipelines.export:ExportConfig")),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="YAML (optional)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in STAGES:
            config_cls, runner, _, _ = STAGES[args.command]
            cfg = load_config(_load(config_cls), args.config, args.overrides)
            summary = _load(runner)(cfg, resume=args.resume, stop_after=args.stop_after)
            print(json.dumps(summary, indent=2, default=str))
        elif args.command in ("demo", "ablate"):
            from .ablate import AblateConfig, run_ablation

            run_ablation(load_config(AblateConfig, args.config, args.overrides))
        elif args.command == "evaluate":
            from .evaluate import EvaluateConfig, run_evaluate

            print(json.dumps(run_evaluate(load_config(EvaluateConfig, args.config, args.overrides)), indent=2))
        elif args.command == "export-hf":
            from .export import ExportConfig, run_export

            print(json.dumps(run_export(load_config(ExportConfig, args.config, args.overrides)), indent=2))
        elif args.command == "prepare":
            from .demo import prepare

            prepare()
    except (ConfigError, FileNotFoundError) as err:  # the input is wrong: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except _run_failures() as err:  # the run stopped on purpose (data, loss, checkpoint, export check)
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


def _run_failures() -> tuple[type[Exception], ...]:
    from dvlp_common.records import TooManySkippedRecords
    from vl_align.export import ExportError

    from .checkpoint import UnsafeCheckpointError
    from .training import NonFiniteLoss

    return TooManySkippedRecords, NonFiniteLoss, UnsafeCheckpointError, ExportError


if __name__ == "__main__":
    sys.exit(main())
