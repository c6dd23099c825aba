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
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from dvlp_common.config import ConfigError, describe, load_config
from dvlp_common.memory import keep_freed_memory

from .config import CONFIG_DIR


@dataclass(frozen=True)
class Command:
    """One ``dvlp`` subcommand: its config class and runner (``module:name``, imported when used), help text and
    default YAML (a YAML under configs/ belongs to the command whose default's file name starts it)."""
    config: str | None
    runner: str
    help: str
    default_yaml: str | None = None
    trains: bool = False  # takes --resume and --stop-after
    prints_result: bool = True  # print the runner's returned dict as JSON


COMMANDS: dict[str, Command] = {
    "stage1": Command("pipelines.stage1:Stage1Config", "pipelines.stage1:run_stage1",
                      "Stage 1: text-only P-Former pre-training and its evaluation", "stage1.yaml", trains=True),
    "stage2": Command("pipelines.stage2:Stage2Config", "pipelines.stage2:run_stage2",
                      "Stage 2a: representation learning (ITC+ITM+ITG + P-Former alignment), qformer or elip front",
                      "stage2.yaml", trains=True),
    "generate-stage": Command("pipelines.generative:GenerativeConfig", "pipelines.generative:run_generative",
                              "Stage 2b: generative learning (front -> LLM prefix), then caption/VQA evaluation",
                              "generative.yaml", trains=True),
    "demo": Command("pipelines.ablate:AblateConfig", "pipelines.ablate:run_ablation",
                    "The whole pipeline on the embedded easy-VQA default: stage 1, then per arm (BLIP-2 baseline, "
                    "P-Former, caption-free control) stage 2a, stage 2b and the held-out evaluation; table, plots, "
                    "captions", "demo.yaml", prints_result=False),
    "ablate": Command("pipelines.ablate:AblateConfig", "pipelines.ablate:run_ablation",
                      "Ablation against BLIP-2: stage 1 once, then arms x pairs x learning rates x seeds through "
                      "stages 2a/2b and evaluation; mean ± std, collapse rate, significance, plots", "ablate.yaml",
                      prints_result=False),
    "evaluate": Command("pipelines.evaluate:EvaluateConfig", "pipelines.evaluate:run_evaluate",
                        "Held-out captioning and zero-shot VQA of a saved generative front (any kind), e.g. under "
                        "another generation protocol", "evaluate.yaml"),
    "export-hf": Command("pipelines.export:ExportConfig", "pipelines.export:run_export",
                         "Export a trained Q-Former front as a transformers Blip2ForConditionalGeneration folder"),
    "prepare": Command(None, "pipelines.demo:prepare",
                       "build the offline model presets and the embedded data into the cache", prints_result=False),
}


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def config_class_for(path: Path):
    """The config class of a YAML under configs/: that of the command whose default YAML's name starts it, after a
    ``video_`` prefix (``video_generative.yaml`` is a generate-stage config of a video front)."""
    owners = {Path(c.default_yaml).stem: c.config for c in COMMANDS.values() if c.default_yaml}
    stem = Path(path).stem.removeprefix("video_")
    for prefix, target in owners.items():
        if stem.startswith(prefix):
            return _load(target)
    raise ValueError(f"{path}: no stage owns this config; file names start with one of {', '.join(owners)}")


def _keys_help(cls) -> str:
    lines = ["configuration keys (override with key.sub=value):"]
    for key, tp, default, help_text in describe(cls):
        lines.append(f"  {key} ({tp}, default {json.dumps(default)})" + (f": {help_text}" if help_text else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvlp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        if command.config is None:
            sub.add_parser(name, help=command.help, description=command.help)
            continue
        p = sub.add_parser(name, help=command.help, description=command.help,
                           epilog=_keys_help(_load(command.config)),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        default = CONFIG_DIR / command.default_yaml if command.default_yaml else None
        p.add_argument("--config", type=Path, default=default,
                       help=f"YAML config (default: configs/{command.default_yaml})" if default else "YAML (optional)")
        if command.trains:
            p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
            p.add_argument("--stop-after", type=int, default=None, help="stop after this many optimizer steps "
                                                                        "(testing and time-boxed runs; resume later)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # CPU steps reuse their large buffers instead of faulting fresh pages every step
    command = COMMANDS[args.command]
    try:
        runner = _load(command.runner)
        if command.config is None:
            result = runner()
        else:
            cfg = load_config(_load(command.config), args.config, args.overrides)
            result = runner(cfg, resume=args.resume, stop_after=args.stop_after) if command.trains else runner(cfg)
        if command.prints_result:
            print(json.dumps(result, indent=2, default=str))
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
