"""What a job does, keyed by the top-level ``mode`` option: one function per mode, each taking the ``Job``."""
from conf.registry import Registry

MODES: Registry = Registry("mode")

from trainers.modes import analyze, eval, export, ptq, ptq_vs_qat, train  # noqa: E402,F401  (registers the modes)
