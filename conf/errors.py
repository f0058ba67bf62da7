"""User-facing error types.

Why: bad input must end in *one* clear message and a non-zero exit, never a traceback. ``main.py`` catches
these (and ``quant.QuantError``) and prints only the message. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by what the user asked for (config, data, checkpoint), with a message that says how to fix it."""


class ConfigError(UserError):
    """A config value is wrong: the message names the field, the bad value and the valid choices."""


class DataError(UserError):
    """A data set cannot be read: the message names the file or folder."""
