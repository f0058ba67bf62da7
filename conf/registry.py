"""Name -> builder registries, one per config group.

Why: ``model=unet`` on the command line must map to exactly one builder, and an unknown name must fail with the
list of valid names. Each package (``data``, ``models``, ``trainers``) owns one ``Registry`` keyed by the same
names as the YAML files in its config group (``conf/model/unet.yaml`` <-> ``@MODELS.register("unet")``).
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from conf.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of builders for one config group."""

    def __init__(self, group: str) -> None:
        self.group = group
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.group} registry: {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"{self.group}={name!r} is not a known option; valid choices: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
