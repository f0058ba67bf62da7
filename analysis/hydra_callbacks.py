"""Hydra callback that writes the comparison report when a multirun ends.

Registered in ``conf/config.yaml`` as::

    hydra:
      callbacks:
        comparison_report:
          _target_: analysis.hydra_callbacks.ComparisonReport

The report goes to ``<sweep dir>/report/report.html``. A failure to build it is logged, not raised: the jobs'
results are already on disk and ``python -m analysis.report <sweep dir>`` can rebuild the page later.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from analysis.report import DEFAULT_BASELINES, build_report
from conf.errors import UserError

log = logging.getLogger(__name__)


class ComparisonReport(Callback):
    def __init__(self, baselines: Sequence[str] = DEFAULT_BASELINES, enabled: bool = True) -> None:
        self.baselines = tuple(baselines)
        self.enabled = enabled

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            page = build_report([sweep_dir], sweep_dir / "report", self.baselines)
        except UserError as exc:
            log.warning("No comparison report for %s: %s", sweep_dir, exc)
            return
        except Exception:  # noqa: BLE001 - the sweep's results are on disk; never fail the sweep for the report
            log.exception("Building the comparison report for %s failed; rebuild it with "
                          "`python -m analysis.report %s`", sweep_dir, sweep_dir)
            return
        log.info("Comparison report: %s", page)
        print(f"[fp4lab] comparison report: {page}")
