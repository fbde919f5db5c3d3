"""Run configuration: one dataclass per section, loaded from YAML in configs/, overridden with --set a.b=c.

    cfg = load_config("configs/demo.yaml", overrides=["train.lr=1e-4", "perturb.beta=0.2"], world_size=2)

Rules (the same for YAML and --set):
- an unknown key is an error that names its section and lists the close valid keys (difflib) and all of them;
- values are type-checked against the dataclass annotations before anything runs (bools are not ints, ints are
  accepted where floats are expected, lists become tuples where a tuple is expected);
- each section's own impossible values fail in its __post_init__, naming the field; checks that need two
  sections (perturb.delta <= tokenizer.codebook_size, batch divisible by the world size, ...) are in
  `check_config`.
- a section whose class has a preset registry (tokenizer) accepts `preset: NAME` as its base.

The sections themselves are dataclasses beside the code they configure (data/, models/, losses/, perturb.py) or
in this package (train, gen, post, cache, eval); every one is built by tokpost_fast.checks.build_section. To add
a section: add one field to `Config` (and, when the section has presets, one entry to `PRESETS`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

from tokpost_fast import checks
from tokpost_fast.atomic import atomic_write_text
from tokpost_fast.checks import ConfigError, init_fields, type_name, unknown_key
from tokpost_fast.config.cache import CacheStageConfig
from tokpost_fast.config.eval import EvalConfig
from tokpost_fast.config.gen import GenStageConfig
from tokpost_fast.config.post import PostStageConfig
from tokpost_fast.config.train import TrainConfig
from tokpost_fast.data import DataConfig
from tokpost_fast.losses import LossConfig
from tokpost_fast.models.tokenizer.config import TOKENIZER_PRESETS, VQ_ARCHS, CodebookConfig, TokenizerConfig
from tokpost_fast.perturb import PerturbConfig, perturbed_count


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    gen: GenStageConfig = field(default_factory=GenStageConfig)
    cache: CacheStageConfig = field(default_factory=CacheStageConfig)
    post: PostStageConfig = field(default_factory=PostStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Section classes with named presets: `preset: NAME` in that section starts from the preset instead of defaults.
PRESETS: dict[type, dict[str, Any]] = {TokenizerConfig: TOKENIZER_PRESETS}


# ---------------------------------------------------------------------------------------------------------------
# YAML: PyYAML follows YAML 1.1, where "3e-5" (no dot) is a string; configs are full of such learning rates.
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A --set value, read as YAML: 3e-5 -> float, [0.9, 0.95] -> list, null -> None, abc -> 'abc'."""
    return yaml.load(text, Loader=_Loader) if text.strip() else None


def read_yaml(path: Union[str, Path]) -> dict:
    with open(path) as f:
        raw = yaml.load(f, Loader=_Loader)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def build_section(cls: type, raw: Any, where: str) -> Any:
    """dict -> section dataclass `cls` (tokpost_fast.checks.build_section), with `preset: NAME` for the sections
    that have presets."""
    return checks.build_section(cls, raw, where, presets=PRESETS.get(cls))


def _check_path(path: list[str], origin: str) -> None:
    """Walk an override's key path through the dataclass tree so a typo fails with the close valid keys."""
    cls: Any = Config
    for depth, key in enumerate(path):
        where = ".".join(path[:depth]) or "config"
        if not dataclasses.is_dataclass(cls):
            if cls is Any or cls is dict or typing.get_origin(cls) is dict:
                return                              # inside a free-form mapping: the build checks types
            raise ConfigError(f"{origin}: {where} is a {type_name(cls)} value, not a section with key {key!r}")
        fields = init_fields(cls)
        if key == "preset" and cls in PRESETS and depth == len(path) - 1:
            return
        if key not in fields:
            valid = list(fields) + (["preset"] if cls in PRESETS else [])
            raise ConfigError(f"{origin}: " + str(unknown_key(where, key, valid)))
        cls = typing.get_type_hints(cls)[key]
        inner = [a for a in typing.get_args(cls) if a is not type(None)]
        if typing.get_origin(cls) in (Union, types.UnionType) and len(inner) == 1:
            cls = inner[0]


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to the raw config tree, in place."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    path = key.split(".")
    if any(not part for part in path):
        raise ConfigError(f"--set {assignment!r}: empty key in {key!r}")
    _check_path(path, f"--set {key}")
    try:
        value = parse_value(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse {text!r} as a YAML value: {e}") from e
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def config_from_dict(raw: dict, where: str = "config") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    sections = init_fields(Config)
    for name in raw:
        if name not in sections:
            raise unknown_key(where, name, sections, what="section")
    hints = typing.get_type_hints(Config)
    return Config(**{name: build_section(hints[name], raw.get(name), name) for name in sections})


def load_config(path: Optional[Union[str, Path]] = None, overrides: Iterable[str] = (),
                world_size: Optional[int] = None, stage: Optional[str] = None) -> Config:
    """YAML file (optional) + --set overrides -> a checked Config. With `world_size`, the checks that depend on
    it (batch divisibility) run too; `stage` (main, gen, ...) skips the checks of settings that stage ignores."""
    raw = read_yaml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = config_from_dict(raw, where=str(path) if path is not None else "config")
    check_config(cfg, world_size=world_size, stage=stage)
    return cfg


def check_config(cfg: Config, world_size: Optional[int] = None, stage: Optional[str] = None) -> None:
    """Checks that involve more than one section. With `world_size`, also resolves the per-rank batch:
    train.global_batch (when set) must divide evenly and becomes data.batch_size = global_batch / world_size.
    The perturbation / main-batch checks apply to stage "main" (and to stage None: check everything)."""
    K = cfg.tokenizer.codebook_size
    if cfg.perturb.delta > K:
        raise ConfigError(f"perturb.delta={cfg.perturb.delta}: must be <= tokenizer.codebook_size={K} "
                          "(a token can only be resampled among codes that exist)")
    if cfg.data.image_size != cfg.tokenizer.image_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size}: must equal "
                          f"tokenizer.image_size={cfg.tokenizer.image_size}")
    cb = cfg.codebook
    if cfg.tokenizer.arch not in VQ_ARCHS and (cb.restart_dead or cb.init != "uniform"):
        raise ConfigError(f"codebook.restart_dead / codebook.init: tokenizer.arch={cfg.tokenizer.arch!r} has no "
                          "codebook; leave the codebook section at its defaults")
    tokens = cb.kmeans_images * cfg.tokenizer.grid_size ** 2
    if cfg.tokenizer.arch in VQ_ARCHS and cb.init == "kmeans" and tokens < K:
        raise ConfigError(f"codebook.kmeans_images={cb.kmeans_images}: {tokens} latent tokens for K = {K} codes; "
                          f"k-means needs >= K (>= {-(-K // cfg.tokenizer.grid_size ** 2)} images)")
    if world_size is None or stage not in (None, "main"):
        return
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: must be >= 1")
    global_batch = cfg.train.global_batch
    if global_batch is not None:
        if global_batch % world_size != 0:
            raise ConfigError(f"train.global_batch={global_batch}: must be divisible by the world size "
                              f"{world_size} (it would be {global_batch / world_size:g} images per rank)")
        cfg.data.batch_size = global_batch // world_size
    local = cfg.data.batch_size
    if cfg.perturb.beta > 0 and perturbed_count(local, cfg.perturb.beta) == 0:
        raise ConfigError(f"perturb.beta={cfg.perturb.beta}: with {local} images per rank no sample is perturbed "
                          f"(floor({local} * {cfg.perturb.beta}) = 0); raise beta or the batch, or set beta 0 "
                          "to train without perturbation")


# ---------------------------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict:
    """Plain dict (tuples as lists) for YAML / JSON."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config, path: Union[str, Path]) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two to_dict() trees, as 'a.b: old -> new'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, prefix=name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
