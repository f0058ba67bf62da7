"""Explain an unknown config key with the list of valid keys, before Hydra starts the job.

Why: Hydra's own message for a misspelt key ("Key 'max_step' not in 'TrainerConfig'") does not say what the valid
keys are. ``main.py`` composes the config once with the command-line overrides (the first value of each sweep) and,
if a key is unknown to its schema, exits with one message that lists the valid keys. Every other composition problem
is left to Hydra, whose messages already name the valid choices (unknown group option, wrong type).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

CONF_DIR = Path(__file__).resolve().parent


def unknown_key_message(argv: list[str]) -> str | None:
    """Return a message naming the unknown key and the valid ones, or None if every override key exists."""
    overrides = _first_values([arg for arg in argv if not arg.startswith("-")])
    if overrides is None:
        return None
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="validate"):
            compose("config", overrides=overrides)
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and dataclasses.is_dataclass(cause.object_type):
            valid = ", ".join(f.name for f in dataclasses.fields(cause.object_type))
            parent = cause.full_key.rpartition(".")[0] or "the root config"
            return f"{cause.full_key} is not a known key; valid keys of {parent}: {valid}"
    except HydraException:
        return None  # Hydra reports it itself, with the valid choices
    return None


def _first_values(args: list[str]) -> list[str] | None:
    """Overrides with each sweep replaced by its first value (None if they cannot be parsed; Hydra will say why)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=args)
        out = []
        for override in parsed:
            if override.get_key_element().startswith("hydra"):
                continue
            if override.is_sweep_override():
                value = next(iter(override.sweep_string_iterator()))
                out.append(f"{override.get_key_element()}={value}")
            else:
                out.append(override.input_line)
        return out
    except Exception:  # noqa: BLE001 - unparsable or non-iterable sweeps (e.g. optuna intervals): leave to Hydra
        return None
