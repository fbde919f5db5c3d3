"""The config package's structure: the engine settings main, gen and post share (declared and checked once in
config/engine.py), every section built by the one strict builder (tokpost_fast.checks.build_section, also behind
the checkpoint loaders' from_dict), and the package's place in the layer order."""

import ast
import dataclasses
from pathlib import Path

import pytest

from tokpost_fast import checks
from tokpost_fast.config import (AutoencoderEngineConfig, Config, ConfigError, EngineConfig, GenStageConfig,
                                 PostStageConfig, TrainConfig, load_config)
from tokpost_fast.models.generator.config import (DIT_PRESETS, GENERATOR_PRESETS, DiTConfig, GeneratorConfig,
                                                  config_from_dict, config_to_dict)
from tokpost_fast.models.tokenizer.config import TOKENIZER_PRESETS, TokenizerConfig

PACKAGE = Path(__file__).resolve().parents[2] / "tokpost_fast"
STAGES = {"train": TrainConfig, "gen": GenStageConfig, "post": PostStageConfig}
ENGINE_FIELDS = [f.name for f in dataclasses.fields(EngineConfig)]

# one impossible value per shared field (for min_lr: above lr)
BAD_SHARED = {"lr": 0, "min_lr": 1.0, "betas": [0.9, 1.0], "weight_decay": -1, "warmup_epochs": -1, "epochs": 0,
              "max_steps": -1, "grad_clip": -1, "ema_decay": 1.0, "log_interval": 0, "sample_interval": -1,
              "ckpt_interval": 0, "keep_checkpoints": 0, "sample_images": 0, "seed": -1, "zero_stage": 3,
              "precision": "fp16", "deepspeed_config": 3, "max_bad_steps": 0}


def test_the_shared_fields_are_declared_once():
    assert sorted(ENGINE_FIELDS) == sorted(BAD_SHARED)
    for cls in STAGES.values():
        hints = dict(zip(ENGINE_FIELDS, (f.type for f in dataclasses.fields(EngineConfig))))
        own = {f.name: f.type for f in dataclasses.fields(cls)}
        assert all(own[name] == hints[name] for name in ENGINE_FIELDS), cls   # a stage changes defaults only
    assert issubclass(TrainConfig, AutoencoderEngineConfig) and issubclass(PostStageConfig, AutoencoderEngineConfig)
    assert not issubclass(GenStageConfig, AutoencoderEngineConfig)


@pytest.mark.parametrize("section", sorted(STAGES))
@pytest.mark.parametrize("name", sorted(BAD_SHARED))
def test_a_bad_shared_field_names_its_own_section(section, name):
    value = BAD_SHARED[name]
    with pytest.raises(ConfigError, match=rf"^{section}\.{name}[=:]"):
        load_config(None, [f"{section}.{name}={value}"])


def test_shared_check_messages():
    def message(override):
        with pytest.raises(ConfigError) as err:
            load_config(None, [override])
        return str(err.value)

    # why ZeRO-3 is refused differs per stage; the rest of each message is the one shared check's
    assert message("train.zero_stage=3") == ("train.zero_stage=3: must be 0, 1 or 2 (stage 3 partitions the "
                                             "parameters the adaptive GAN weight needs whole)")
    assert message("gen.zero_stage=3") == ("gen.zero_stage=3: must be 0, 1 or 2 (stage 3 partitions the weights "
                                           "the rank-0 sample grids need whole)")
    assert message("post.zero_stage=3") == "post.zero_stage=3: must be 0, 1 or 2"
    for section in STAGES:
        assert message(f"{section}.precision=fp16") == f"{section}.precision='fp16': must be auto, fp32 or bf16"
        assert message(f"{section}.lr=0") == f"{section}.lr=0.0: must be > 0"
        # gen checked no seed before the checks were shared; a seed outside [0, 2**62) is refused everywhere now
        assert message(f"{section}.seed=-1") == f"{section}.seed=-1: must be in [0, 2**62)"
    assert message("post.disc_lr=0") == "post.disc_lr=0.0: must be > 0"
    assert message("train.disc_weight_decay=-1") == "train.disc_weight_decay=-1.0: must be >= 0"


def test_stage_defaults_are_pinned():
    shared = dict(min_lr=1e-5, warmup_epochs=1.0, max_steps=None, grad_clip=1.0, log_interval=10, ckpt_interval=1000,
                  keep_checkpoints=2, sample_images=8, seed=0, zero_stage=2, precision="auto",
                  deepspeed_config="configs/deepspeed/zero2.json", max_bad_steps=10)
    expected = {
        "train": dict(shared, lr=3e-5, betas=(0.9, 0.95), weight_decay=0.0, epochs=200, ema_decay=0.999,
                      sample_interval=500, disc_lr=1e-4, disc_weight_decay=5e-4, global_batch=None, usage_window=100,
                      time_split=True),
        "gen": dict(shared, lr=4e-4, betas=(0.9, 0.96), weight_decay=0.03, epochs=400, ema_decay=0.0,
                    sample_interval=0, generator="ar", preset="demo", model={}, global_batch_size=64, order=None,
                    rar_anneal_start=None, rar_anneal_end=None, label_drop=0.1, flip=True, extract_batch_size=64,
                    sample_classes=4, sample_cfg_scale=4.0, sample_cfg_power=1.0, sample_steps=50),
        "post": dict(shared, lr=5e-5, betas=(0.9, 0.95), weight_decay=0.0, epochs=100, ema_decay=0.999,
                     sample_interval=0, disc_lr=5e-5, disc_weight_decay=5e-4, input="tokens", grids="generated",
                     name="post", train_codebook=False, global_batch_size=1024, disc_start=0),
    }
    cfg = Config()
    for section, values in expected.items():
        assert dataclasses.asdict(getattr(cfg, section)) == values, section


# --- one builder --------------------------------------------------------------------------------------------------
TYPOS = {"data": ("image_sise", "image_size"), "tokenizer": ("codebok_size", "codebook_size"),
         "perturb": ("detla", "delta"), "loss": ("lecma", "lecam"), "train": ("disc_lrr", "disc_lr"),
         "codebook": ("dead_windw", "dead_window"), "gen": ("label_dorp", "label_drop"),
         "cache": ("sigmaa", "sigma"), "post": ("grid", "grids"), "eval": ("pfid_alhpa", "pfid_alpha")}


def test_every_section_has_a_typo_case():
    assert sorted(TYPOS) == sorted(f.name for f in dataclasses.fields(Config))


@pytest.mark.parametrize("section", sorted(TYPOS))
def test_unknown_key_names_the_section_and_close_keys(section, tmp_path):
    typo, close = TYPOS[section]
    pattern = rf"unknown key '{typo}'; did you mean [^?]*\b{close}\b.*\(valid keys: .*\b{close}\b"
    with pytest.raises(ConfigError, match=rf"^--set {section}\.{typo}: {section}: {pattern}"):
        load_config(None, [f"{section}.{typo}=1"])
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {typo}: 1\n")
    with pytest.raises(ConfigError, match=rf"^{section}: {pattern}"):
        load_config(path)


@pytest.mark.parametrize("cls, typo, close", [(TokenizerConfig, "codebok_size", "codebook_size"),
                                              (GeneratorConfig, "depht", "depth"), (DiTConfig, "patch", "patch_size")])
def test_saved_configs_are_built_by_the_same_builder(cls, typo, close):
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}: unknown key '{typo}'; did you mean [^?]*\b{close}\b"):
        cls.from_dict({typo: 1})
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{close}: expected int"):
        cls.from_dict({close: "8"})


def test_saved_configs_of_every_preset_load_back():
    for preset in TOKENIZER_PRESETS.values():
        assert TokenizerConfig.from_dict(dataclasses.asdict(preset)) == preset
    for preset in (*GENERATOR_PRESETS.values(), *DIT_PRESETS.values()):
        assert config_from_dict(config_to_dict(preset)) == preset
    old = dataclasses.asdict(GENERATOR_PRESETS["demo"])               # written before generators had kinds,
    old["mlp_ratio"] = 4                                              # with an int where a float is declared
    assert config_from_dict(old) == GENERATOR_PRESETS["demo"]
    with pytest.raises(ConfigError, match="kind"):
        DiTConfig.from_dict({"kind": "ar"})


def test_config_error_is_the_leaf_one():
    assert ConfigError is checks.ConfigError and issubclass(ConfigError, ValueError)


# --- layers -------------------------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Every tokpost_fast module `path` imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "tokpost_fast":   # from tokpost_fast import checks
            names.update(f"tokpost_fast.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "tokpost_fast" or n.startswith("tokpost_fast.")}


def _package(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_config_imports_only_the_layers_below_it():
    below = {"atomic", "checks", "ops", "kernels", "perturb", "data", "models", "losses", "config"}
    for path in sorted((PACKAGE / "config").glob("*.py")):
        above = {m for m in _imports(path) if _package(m) not in below}
        assert not above, f"{path.name} imports {sorted(above)}"


def test_nothing_below_config_imports_it():
    lower = [PACKAGE / "atomic.py", PACKAGE / "checks.py", PACKAGE / "perturb.py"]
    for folder in ("ops", "kernels", "data", "models", "losses"):
        lower += sorted((PACKAGE / folder).rglob("*.py"))
    for path in lower:
        assert not {m for m in _imports(path) if _package(m) == "config"}, path
