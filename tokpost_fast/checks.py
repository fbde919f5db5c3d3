"""How every config section is checked and built, for the sections that live beside their code (data/, models/,
losses/, perturb.py) as much as for the run config's loader (tokpost_fast/config/):

- `field_check`: the one check behind every section's __post_init__, a one-line ValueError naming the field;
- `build_section`: a section dataclass from a mapping, strictly (unknown keys list the close valid ones, values
  are type-checked against the annotations); YAML, --set and saved checkpoints all come through it;
- `ConfigError`: what both raise to the user, so a lower layer can raise it without importing the config package.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any, Callable, Iterable, Mapping, Optional, Union


class ConfigError(ValueError):
    """A bad key, type or value in a run configuration; the message names where it came from."""


def field_check(obj: Any, section: str) -> Callable[[str, bool, str], None]:
    """check(name, ok, why) raises ValueError("<section>.<name>=<value>: <why>") when not ok."""

    def check(name: str, ok: bool, why: str) -> None:
        if not ok:
            raise ValueError(f"{section}.{name}={getattr(obj, name)!r}: {why}")

    return check


def unknown_key(where: str, key: Any, valid: Iterable[str], what: str = "key") -> ConfigError:
    """ConfigError for `key` not among `valid`, listing the close matches (difflib) and then all of them."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(key), valid, n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"{where}: unknown {what} {key!r}{hint} (valid {what}s: {', '.join(valid)})")


def init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of dataclass `cls` that its constructor takes (ClassVars and init=False fields are not keys)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; returns it converted (list -> tuple, dict -> dataclass). Bools
    are not ints, ints are accepted where floats are expected (and become floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:                       # Optional[X]: X's own error is the informative one
            return coerce(options[0], value, where)
        for option in options:
            try:
                return coerce(option, value, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")
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
            return tuple(coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        if len(args) == 2:
            return {coerce(args[0], k, f"{where} key"): coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {type_name(tp)}, got {type(value).__name__} {value!r}")


def build_section(cls: type, raw: Any, where: str, presets: Optional[Mapping[str, Any]] = None) -> Any:
    """dict -> dataclass `cls`, strictly: unknown keys, wrong types and the class's own checks all raise
    ConfigError prefixed with `where` (e.g. "train", "--set train.lr" or "TokenizerConfig"). With `presets`
    (name -> instance of cls), the key `preset: NAME` starts from that instance instead of the defaults."""
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    fields = init_fields(cls)
    raw = dict(raw)
    base = None
    if presets is not None and "preset" in raw:
        name = raw.pop("preset")
        if name not in presets:
            raise unknown_key(f"{where}.preset", name, presets, what="preset")
        base = presets[name]
    for key in raw:
        if key not in fields:
            raise unknown_key(where, key, list(fields) + (["preset"] if presets is not None else []))
    hints = typing.get_type_hints(cls)
    values = {key: coerce(hints[key], value, f"{where}.{key}") for key, value in raw.items()}
    try:
        if base is not None:
            return dataclasses.replace(copy.deepcopy(base), **values)
        return cls(**values)
    except (ValueError, TypeError) as e:
        message = str(e)
        raise ConfigError(message if message.startswith(f"{where}.") else f"{where}: {message}") from e
