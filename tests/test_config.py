from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dvlp_common.config import ConfigError, build, describe, load_config, save_config
from pipelines.cli import CONFIG_DIR, build_parser, config_class_for, main
from pipelines.config import DeepSpeedConfig, OptimConfig
from pipelines.stage1 import Stage1Config

ALL_YAML = sorted(CONFIG_DIR.glob("**/*.yaml"))


def test_there_are_configs():
    assert ALL_YAML, "configs/ holds no YAML"


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_every_yaml_loads(path: Path):
    cls = config_class_for(path)
    cfg = load_config(cls, path)
    assert isinstance(cfg, cls)
    # every key written in the file reaches the config (nothing silently ignored)
    data = yaml.safe_load(path.read_text())
    resolved = cfg.to_dict()

    def walk(tree, node, prefix=""):
        for key, value in tree.items():
            assert key in node, f"{path}: {prefix}{key} not in the resolved config"
            if isinstance(value, dict) and isinstance(node[key], dict) and key != "config_overrides":
                walk(value, node[key], f"{prefix}{key}.")

    walk(data, resolved)


def test_defaults_are_valid_and_saved_round_trip(tmp_path):
    cfg = Stage1Config()
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Stage1Config, tmp_path / "c.yaml") == cfg


def test_overrides_types_and_nesting(tmp_path):
    cfg = load_config(Stage1Config, None, ["optim.lr=3e-4", "optim.betas=[0.9,0.98]", "logging.tensorboard=false",
                                           "model.num_prompts=4", "data.max_records=null"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.98)
    assert cfg.logging.tensorboard is False and cfg.model.num_prompts == 4 and cfg.data.max_records is None
    # the YAML is applied first, then the overrides
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.01\n  max_steps: 5\n  warmup_steps: 0\n")
    cfg = load_config(Stage1Config, tmp_path / "c.yaml", ["optim.max_steps=7"])
    assert cfg.optim.lr == 0.01 and cfg.optim.max_steps == 7


def test_unknown_key_names_closest_spelling(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'lr'"):
        load_config(Stage1Config, None, ["optim.lrr=1"])
    (tmp_path / "c.yaml").write_text("optimm:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"'optimm'.*did you mean 'optim'"):
        load_config(Stage1Config, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"model\.num_promts.*did you mean 'num_prompts'"):
        build(Stage1Config, {"model": {"num_promts": 3}})


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"optim\.max_steps.*expected an integer"):
        load_config(Stage1Config, None, ["optim.max_steps=lots"])
    with pytest.raises(ConfigError, match=r"logging\.tensorboard.*true or false"):
        load_config(Stage1Config, None, ["logging.tensorboard=3"])
    with pytest.raises(ConfigError, match=r"optim\.betas.*expected 2 items"):
        load_config(Stage1Config, None, ["optim.betas=[0.9]"])


def test_out_of_range_and_choices():
    with pytest.raises(ConfigError, match=r"optim\.lr.*must be > 0"):
        load_config(Stage1Config, None, ["optim.lr=0"])
    with pytest.raises(ConfigError, match=r"model\.mask_prob.*must be < 1"):
        load_config(Stage1Config, None, ["model.mask_prob=1.5"])
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage.*allowed values: 0, 1, 2, 3"):
        load_config(Stage1Config, None, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"'precision'.*allowed values: 'auto'"):
        build(DeepSpeedConfig, {"precision": "int8"})


def test_cross_field_rules():
    with pytest.raises(ConfigError, match=r"min_lr.*must be <= lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps.*<= max_steps"):
        load_config(Stage1Config, None, ["optim.warmup_steps=10", "optim.max_steps=5"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Stage1Config, None, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"optim\.lr.*no sub-keys"):
        load_config(Stage1Config, None, ["optim.lr.x=1"])


def test_missing_config_file_is_clear(tmp_path, capsys):
    assert main(["stage1", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cli_rejects_misspelt_key(capsys):
    assert main(["stage1", "optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_help_lists_every_key():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["stage1"].format_help()
    for key, *_ in describe(Stage1Config):
        assert key in text


@pytest.mark.parametrize("override, key", [
    ("front.elip.keep_ratios=[0.6,0.65,0.4]", "front.elip.keep_ratios"),  # increasing
    ("front.elip.keep_ratios=[0.9,0.0,0.4]", "front.elip.keep_ratios"),  # outside (0, 1]
    ("front.elip.lookahead_depths=[2,6]", "front.elip.prune_after_layers"),  # lengths differ
    ("front.elip.prune_after_layers=[4,2,10]", "front.elip.prune_after_layers"),  # not increasing
    ("front.elip.text_weight=1.5", "front.elip.text_weight"),
])
def test_a_bad_elip_schedule_is_a_config_error_at_load(override, key, capsys):
    """ELIP's front config used to repeat ElipConfig's fields without its checks: a bad schedule passed load_config
    and failed after the caches were built, as a bare ValueError traceback."""
    from pipelines.stage2 import Stage2Config

    with pytest.raises(ConfigError) as err:
        load_config(Stage2Config, CONFIG_DIR / "stage2_elip.yaml", [override])
    assert err.value.key == key
    assert main(["stage2", "--config", str(CONFIG_DIR / "stage2_elip.yaml"), override]) == 2
    assert capsys.readouterr().err.startswith(f"error: config key '{key}'")


def test_the_qformer_config_validates_like_every_config():
    from vl_align.qformer import QFormerConfig

    with pytest.raises(ConfigError, match="num_query_tokens"):
        QFormerConfig(vision_width=32, num_query_tokens=0)
    with pytest.raises(ConfigError, match="vision_width"):
        QFormerConfig(vision_width="wide")


def test_wsd_schedule_is_constant_then_decays_to_the_floor():
    from pipelines.optim import lr_at

    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_start_lr=0.0, warmup_steps=10, max_steps=100, schedule="wsd",
                      decay_fraction=0.2)
    assert cfg.decay_start == 80
    assert lr_at(5, cfg) == pytest.approx(5e-4)  # warm-up as for cosine
    assert [lr_at(s, cfg) for s in (10, 50, 80)] == [1e-3] * 3
    assert lr_at(90, cfg) == pytest.approx(5.5e-4) and lr_at(100, cfg) == pytest.approx(1e-4)
    assert lr_at(90, cfg.replace(decay_shape="1-sqrt")) == pytest.approx(1e-3 - 9e-4 * 0.5 ** 0.5)
    # cosine (the default) is unchanged: half-way between lr and min_lr at the middle of the decay
    assert lr_at(55, cfg.replace(schedule="cosine")) == pytest.approx(5.5e-4)
    with pytest.raises(ConfigError, match="warm-up .* must end before the decay"):
        cfg.replace(warmup_steps=90)


def test_lr_scale_gives_the_named_parameters_their_own_rate():
    """W (llm_proj) can learn faster than the rest of the front: in 40 steps at 1e-4 it barely moved (issue 19)."""
    import torch

    from pipelines.optim import build_optimizer, lr_at

    model = torch.nn.ModuleDict({"qformer": torch.nn.Linear(4, 4), "llm_proj": torch.nn.Linear(4, 8)})
    cfg = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=0, max_steps=10, lr_scale={"llm_proj": 30})
    groups = build_optimizer(model, cfg).param_groups
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model["llm_proj"].weight)]["lr"] == pytest.approx(3e-3)
    assert by_param[id(model["llm_proj"].bias)]["weight_decay"] == 0.0  # still no decay on biases
    assert by_param[id(model["qformer"].weight)]["lr"] == pytest.approx(1e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-5)  # one schedule, scaled per group by the optimizer's LambdaLR
    assert len(build_optimizer(model, OptimConfig()).param_groups) == 2  # without scales: as before
    with pytest.raises(ConfigError, match="lr_scale"):
        build_optimizer(model, cfg.replace(lr_scale={"w_proj": 10}))
    with pytest.raises(ConfigError, match="lr_scale.llm_proj"):
        OptimConfig(lr_scale={"llm_proj": 0})
