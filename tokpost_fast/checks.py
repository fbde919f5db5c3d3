"""One check for every config dataclass's __post_init__: a one-line ValueError naming the field and its value."""

from __future__ import annotations

from typing import Any, Callable


def field_check(obj: Any, section: str) -> Callable[[str, bool, str], None]:
    """check(name, ok, why) raises ValueError("<section>.<name>=<value>: <why>") when not ok."""

    def check(name: str, ok: bool, why: str) -> None:
        if not ok:
            raise ValueError(f"{section}.{name}={getattr(obj, name)!r}: {why}")

    return check
