"""The ``data`` config group's registry: ``data=coco`` <-> ``@DATAMODULES.register("coco")``.

Kept in its own module so every data-set module can register itself without importing the package ``__init__``.
"""
from __future__ import annotations

from conf.registry import Registry

DATAMODULES: Registry = Registry("data")
