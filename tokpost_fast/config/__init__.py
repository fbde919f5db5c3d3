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

To add a section: add one field to `Config` (and, when the section has presets, one entry to `PRESETS`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

from tokpost_fast.checks import field_check
from tokpost_fast.data import DataConfig
from tokpost_fast.losses import LossConfig
from tokpost_fast.metrics.config import EvalConfig
from tokpost_fast.models.tokenizer.config import TOKENIZER_PRESETS, VQ_ARCHS, CodebookConfig, TokenizerConfig
from tokpost_fast.perturb import PerturbConfig, perturbed_count
from tokpost_fast.config.cache import CacheStageConfig
from tokpost_fast.config.gen import GenStageConfig
from tokpost_fast.config.post import PostStageConfig

PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A bad key, type or value in a run configuration; the message names where it came from."""


@dataclass
class TrainConfig:
    """Main-stage optimisation (SPEC A1). Epoch-based schedule; max_steps only stops early (the LR schedule never
    depends on it, so a run cut at N steps and resumed is the same run as one that goes on)."""

    lr: float = 3e-5                 # autoencoder (encoder, decoder, codebook)
    disc_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    disc_weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5             # cosine floor for the autoencoder; the discriminator's is scaled alike
    epochs: int = 200
    max_steps: Optional[int] = None  # stop after this many optimizer steps in total (None: run all epochs)
    global_batch: Optional[int] = None  # images per step over all ranks; sets data.batch_size = global / world
    grad_clip: float = 1.0           # global grad-norm clip per engine; 0 disables
    ema_decay: float = 0.999         # EMA of the autoencoder's weights; the EMA model is what is exported
    log_interval: int = 10           # steps between log.jsonl rows
    sample_interval: int = 500       # steps between sample grids (0: only at the end)
    ckpt_interval: int = 1000        # steps between checkpoints (and always at the end)
    keep_checkpoints: int = 2        # newest checkpoints kept on disk
    usage_window: int = 100          # steps of code indices behind the codebook usage / perplexity numbers
    sample_images: int = 8           # images per row of the sample grid
    seed: int = 0
    zero_stage: int = 2
    precision: str = "auto"          # auto: bf16 on GPU, fp32 on CPU
    deepspeed_config: str = "configs/deepspeed/zero2.json"
    max_bad_steps: int = 10          # consecutive non-finite losses before the run stops
    time_split: bool = True          # per-phase timings in the log (synchronises the GPU between phases)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)

        check = field_check(self, "train")

        check("lr", self.lr > 0, "must be > 0")
        check("disc_lr", self.disc_lr > 0, "must be > 0")
        check("betas", len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "two values in [0, 1)")
        check("weight_decay", self.weight_decay >= 0, "must be >= 0")
        check("disc_weight_decay", self.disc_weight_decay >= 0, "must be >= 0")
        check("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0")
        check("min_lr", 0 <= self.min_lr <= self.lr, "must be in [0, lr]")
        check("epochs", self.epochs >= 1, "must be >= 1")
        check("max_steps", self.max_steps is None or self.max_steps >= 0, "must be None or >= 0")
        check("global_batch", self.global_batch is None or self.global_batch >= 1, "must be None or >= 1")
        check("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 disables)")
        check("ema_decay", 0.0 <= self.ema_decay < 1.0, "must be in [0, 1)")
        for name in ("log_interval", "ckpt_interval", "usage_window", "sample_images", "max_bad_steps"):
            check(name, getattr(self, name) >= 1, "must be >= 1")
        check("sample_interval", self.sample_interval >= 0, "must be >= 0")
        check("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1")
        check("seed", 0 <= self.seed < 2**62, "must be in [0, 2**62)")
        check("zero_stage", self.zero_stage in (0, 1, 2),
              "must be 0, 1 or 2 (stage 3 partitions the parameters the adaptive GAN weight needs whole)")
        check("precision", self.precision in PRECISIONS, f"must be one of {PRECISIONS}")


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


# ---------------------------------------------------------------------------------------------------------------
def _unknown_key(where: str, key: Any, valid: Iterable[str], what: str = "key") -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(str(key), valid, n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{where}: unknown {what} {key!r}{hint} (valid {what}s: {', '.join(valid)})")


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; returns it converted (list -> tuple, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:                       # Optional[X]: X's own error is the informative one
            return _coerce(options[0], value, where)
        for option in options:
            try:
                return _coerce(option, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r} (quote it)")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        if len(args) == 2:
            return {_coerce(args[0], k, f"{where} key"): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def build_section(cls: type, raw: Any, where: str) -> Any:
    """dict -> dataclass `cls`, strictly: unknown keys, wrong types and the class's own checks all raise
    ConfigError prefixed with `where` (e.g. "train" or "--set train.lr")."""
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    fields = _init_fields(cls)
    raw = dict(raw)
    presets = PRESETS.get(cls)
    base = None
    if presets is not None and "preset" in raw:
        name = raw.pop("preset")
        if name not in presets:
            raise _unknown_key(f"{where}.preset", name, presets, what="preset")
        base = presets[name]
    for key in raw:
        if key not in fields:
            raise _unknown_key(where, key, list(fields) + (["preset"] if presets is not None else []))
    hints = typing.get_type_hints(cls)
    values = {key: _coerce(hints[key], value, f"{where}.{key}") for key, value in raw.items()}
    try:
        if base is not None:
            return dataclasses.replace(copy.deepcopy(base), **values)
        return cls(**values)
    except (ValueError, TypeError) as e:
        message = str(e)
        raise ConfigError(message if message.startswith(f"{where}.") else f"{where}: {message}") from e


def _check_path(path: list[str], origin: str) -> None:
    """Walk an override's key path through the dataclass tree so a typo fails with the close valid keys."""
    cls: Any = Config
    for depth, key in enumerate(path):
        where = ".".join(path[:depth]) or "config"
        if not dataclasses.is_dataclass(cls):
            if cls is Any or cls is dict or typing.get_origin(cls) is dict:
                return                              # inside a free-form mapping: the build checks types
            raise ConfigError(f"{origin}: {where} is a {_type_name(cls)} value, not a section with key {key!r}")
        fields = _init_fields(cls)
        if key == "preset" and cls in PRESETS and depth == len(path) - 1:
            return
        if key not in fields:
            valid = list(fields) + (["preset"] if cls in PRESETS else [])
            raise ConfigError(f"{origin}: " + str(_unknown_key(where, key, valid)))
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
    sections = _init_fields(Config)
    for name in raw:
        if name not in sections:
            raise _unknown_key(where, name, sections, what="section")
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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


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
