"""Run configuration (tokpost_fast/config/loader.py): YAML + --set, strict keys with close matches, types and values
checked before any work, naming the field; and train.py's handling of bad configs and missing stages."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tokpost_fast.config import (Config, ConfigError, TrainConfig, apply_override, config_diff, dump_config,
                                 load_config, parse_value, read_yaml, to_dict)
from tokpost_fast.perturb import PerturbConfig

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_are_the_paper_values():
    cfg = load_config()
    assert (cfg.perturb.alpha, cfg.perturb.beta, cfg.perturb.delta) == (1.0, 0.1, 100)
    assert (cfg.perturb.anneal_start, cfg.perturb.anneal_end, cfg.perturb.end_ratio) == (40, 120, 0.5)
    t = cfg.train
    assert (t.lr, t.disc_lr, t.betas, t.weight_decay, t.disc_weight_decay) == (3e-5, 1e-4, (0.9, 0.95), 0.0, 5e-4)
    assert (t.min_lr, t.warmup_epochs, t.zero_stage, t.precision) == (1e-5, 1.0, 2, "auto")


@pytest.mark.parametrize("name", ["demo.yaml", "vq16.yaml", "robustok.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name, world_size=1)
    assert cfg.perturb.delta <= cfg.tokenizer.codebook_size


def test_paper_configs_carry_the_paper_values():
    robustok = load_config(REPO / "configs" / "robustok.yaml", world_size=8)
    tok = robustok.tokenizer
    assert (tok.arch, tok.image_size, tok.codebook_size, tok.codebook_embed_dim, tok.grid_size) == ("vit", 256, 4096,
                                                                                                    64, 16)
    assert robustok.train.global_batch == 1024 and robustok.data.batch_size == 128      # 1024 over 8 ranks
    assert (robustok.train.epochs, robustok.train.lr, robustok.train.disc_lr) == (200, 3e-5, 1e-4)
    vq16 = load_config(REPO / "configs" / "vq16.yaml", world_size=8).tokenizer
    assert (vq16.arch, vq16.image_size, vq16.codebook_size, vq16.codebook_embed_dim, vq16.grid_size) == (
        "vq_cnn", 256, 16384, 8, 16)


def test_yaml_and_set_overrides(tmp_path):
    path = write(tmp_path, """\
        train: {lr: 3e-5, epochs: 7}
        perturb: {beta: 0.25}
    """)
    cfg = load_config(path, ["train.lr=1e-4", "train.betas=[0.8, 0.9]", "perturb.delta=50",
                             "tokenizer.preset=vq16", "data.image_size=256", "train.max_steps=null"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)       # "1e-4" read as a float, not a string
    assert cfg.train.epochs == 7 and cfg.perturb.beta == 0.25 and cfg.perturb.delta == 50
    assert cfg.train.betas == (0.8, 0.9)                                  # list -> tuple
    assert cfg.tokenizer.codebook_size == 16384                           # from the preset
    assert cfg.train.max_steps is None
    # later --set wins
    assert load_config(path, ["train.lr=1", "train.lr=2"]).train.lr == 2.0


def test_parse_value_reads_yaml_scalars():
    assert parse_value("3e-5") == 3e-5 and parse_value("1E4") == 1e4
    assert parse_value("true") is True and parse_value("null") is None and parse_value("abc") == "abc"
    assert parse_value("[1, 2]") == [1, 2]


@pytest.mark.parametrize("text, where, close", [
    ("train: {lrr: 1.0}", "train", "lr"),
    ("perturb: {detla: 3}", "perturb", "delta"),
    ("trian: {lr: 1.0}", "config", "train"),
    ("loss: {disc_strat: 3}", "loss", "disc_start"),
])
def test_unknown_yaml_key_lists_close_valid_keys(tmp_path, text, where, close):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    assert "unknown" in message and f"did you mean {close}" in message
    assert "valid" in message


def test_unknown_set_key_names_the_override():
    with pytest.raises(ConfigError, match=r"--set train\.lrr.*did you mean lr"):
        load_config(None, ["train.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"--set perturb\.alpha\.x"):
        load_config(None, ["perturb.alpha.x=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize("override, field", [
    ("train.lr=abc", "train.lr"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.time_split=1", "train.time_split"),
    ("perturb.delta=[3]", "perturb.delta"),
    ("train.betas=[0.9]", "train.betas"),
    ("data.root=5", "data.root"),
])
def test_wrong_type_fails_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override, field", [
    ("perturb.beta=1.5", "perturb.beta"),
    ("perturb.beta=-0.1", "perturb.beta"),
    ("perturb.alpha=2", "perturb.alpha"),
    ("perturb.delta=0", "perturb.delta"),
    ("perturb.delta=5000", "perturb.delta"),                # > tokenizer.codebook_size 1024
    ("perturb.end_ratio=1.5", "perturb.end_ratio"),
    ("perturb.anneal_end=10", "perturb.anneal_end"),       # < anneal_start 40
    ("train.lr=0", "train.lr"),
    ("train.zero_stage=3", "train.zero_stage"),
    ("train.precision=fp16", "train.precision"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("tokenizer.codebook_size=0", "codebook_size"),
    ("data.image_size=128", "data.image_size"),            # != tokenizer.image_size
])
def test_impossible_values_fail_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_delta_larger_than_codebook_names_both():
    with pytest.raises(ConfigError, match=r"perturb\.delta=100.*tokenizer\.codebook_size=64"):
        load_config(None, ["tokenizer.codebook_size=64"])


def test_batch_checks_need_the_world_size():
    with pytest.raises(ConfigError, match=r"train\.global_batch=10.*world size 4"):
        load_config(None, ["train.global_batch=10"], world_size=4)
    cfg = load_config(None, ["train.global_batch=1024"], world_size=8)
    assert cfg.data.batch_size == 128
    # beta > 0 that perturbs nobody is refused rather than silently off
    with pytest.raises(ConfigError, match=r"perturb\.beta=0\.1.*4 images per rank"):
        load_config(None, ["data.batch_size=4"], world_size=1)
    assert load_config(None, ["data.batch_size=4", "perturb.beta=0"], world_size=1).perturb.beta == 0
    # stages that never perturb do not trip over the main stage's batch checks
    assert load_config(None, ["data.batch_size=4"], world_size=1, stage="gen").data.batch_size == 4


def test_presets_are_checked():
    with pytest.raises(ConfigError, match=r"unknown preset 'vq17'.*did you mean vq16"):
        load_config(None, ["tokenizer.preset=vq17"])


def test_dump_roundtrip_and_diff(tmp_path):
    cfg = load_config(None, ["train.lr=1e-4"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    other = load_config(tmp_path / "c.yaml", ["train.epochs=3"])
    assert config_diff(to_dict(cfg), to_dict(other)) == ["train.epochs: 200 -> 3"]


def test_adding_a_section_is_one_field():
    # every section of Config is a dataclass built strictly from its own YAML mapping
    import dataclasses

    assert [f.name for f in dataclasses.fields(Config)][:5] == ["data", "tokenizer", "perturb", "loss", "train"]
    assert isinstance(Config().train, TrainConfig) and isinstance(Config().perturb, PerturbConfig)


def test_apply_override_builds_nested_keys():
    raw = {}
    apply_override(raw, "train.lr=0.5")
    apply_override(raw, "tokenizer.ch_mult=[1, 2]")
    assert raw == {"train": {"lr": 0.5}, "tokenizer": {"ch_mult": [1, 2]}}


def test_read_yaml_rejects_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(write(tmp_path, "- a\n- b\n"))


# --- train.py ---------------------------------------------------------------------------------------------------
def test_train_cli_reports_config_errors_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tokpost_fast" / "train.py"), "--stage", "main",
                             "--config", str(REPO / "configs" / "demo.yaml"), "--run-dir", str(tmp_path / "run"),
                             "--set", "perturb.beta=2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "perturb.beta=2" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_stage_is_a_clear_error(monkeypatch):
    import tokpost_fast.stages as stages

    monkeypatch.setattr(stages, "STAGES", stages.STAGES + ("not_yet",))
    with pytest.raises(stages.StageNotImplemented, match=r"stage 'not_yet' is not implemented yet"):
        stages.get_stage("not_yet")
    with pytest.raises(ValueError, match="unknown stage"):
        stages.get_stage("nope")


def test_train_flags_become_overrides():
    from tokpost_fast.train import overrides, parse_args

    args = parse_args(["--stage", "main", "--config", "c.yaml", "--run-dir", "r", "--set", "train.lr=1",
                       "--max-steps", "7", "--data-backend", "torch", "--on-bad-image", "error", "--local_rank=1"])
    assert overrides(args) == ["train.lr=1", "train.max_steps=7", "data.backend=torch", "data.on_bad_image=error"]
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides(args))
    assert cfg.train.max_steps == 7 and cfg.data.backend == "torch" and cfg.data.on_bad_image == "error"
    with pytest.raises(SystemExit):
        parse_args(["--stage", "nope", "--config", "c.yaml", "--run-dir", "r"])


def test_field_check_names_section_field_and_value():
    """tokpost_fast/checks.py: the one check behind every config section's one-line ValueError."""
    from tokpost_fast.checks import field_check

    class Section:
        lr = -1.0

    check = field_check(Section(), "train")
    check("lr", True, "must be > 0")  # passes silently
    with pytest.raises(ValueError, match=r"^train\.lr=-1\.0: must be > 0$"):
        check("lr", False, "must be > 0")
    with pytest.raises(ValueError, match=r"^train\.warmup_epochs=-2: must be >= 0$"):
        TrainConfig(warmup_epochs=-2)
