"""Validation helpers shared by the structured-config schemas.

Why: every schema's ``__post_init__`` must fail the same way, naming the field, the bad value and the valid
choices, so the user sees one clear message (``conf.errors.ConfigError``) before any data is touched.
"""
from __future__ import annotations

from typing import Iterable

from hydra.core.config_store import ConfigStore

from conf.errors import ConfigError


def check_choice(where: str, field: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{_key(where, field)}={value!r} is not valid; valid choices: {', '.join(map(str, choices))}")


def check_range(where: str, field: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ConfigError(f"{_key(where, field)}={value!r} is out of range; valid range: [{lo_s}, {hi_s}]")


def _key(where: str, field: str) -> str:
    return f"{where}.{field}" if where else field


def store_schema(group: str, name: str, node: type) -> None:
    """Register a dataclass as ``schema/<group>/<name>``; YAML files extend it with ``- /schema/<group>/<name>@_here_``."""
    ConfigStore.instance().store(group=f"schema/{group}", name=name, node=node)
