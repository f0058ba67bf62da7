"""Figure writing off the training thread.

Why: measuring a model is cheap (a few reductions per layer), drawing its ~20 figures with matplotlib is not (about
0.1 s each). The callback therefore snapshots the numbers on the training thread and hands the drawing to one worker
thread; the W&B payloads the worker produces are logged back on the training thread (W&B's ``log`` is called from
one thread only), at the next batch or at the end of training, each with the step it belongs to.

Only this one worker ever touches matplotlib (object API, no pyplot), so figures never share state between threads.
A job that fails re-raises its exception on the training thread at the next ``ready``/``drain``: a broken figure must
not pass silently.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

from analysis.wandb_log import WandbPayload

Job = Callable[[], WandbPayload]


class BackgroundWriter:
    """Runs write jobs in submission order on one daemon thread (or inline when ``background`` is false)."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._jobs: queue.Queue[tuple[int, Job] | None] = queue.Queue()
        self._done: list[tuple[int, WandbPayload]] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, step: int, job: Job) -> None:
        if not self.background:
            self._done.append((step, job()))
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="fp4lab-analysis-writer", daemon=True)
            self._thread.start()
        self._jobs.put((step, job))

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            try:
                if item is None:
                    return
                step, job = item
                payload = job()
                with self._lock:
                    self._done.append((step, payload))
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread by _take
                with self._lock:
                    self._error = self._error or exc
            finally:
                self._jobs.task_done()

    def ready(self) -> list[tuple[int, WandbPayload]]:
        """Payloads finished so far, oldest first (without waiting)."""
        with self._lock:
            done, self._done = self._done, []
            error, self._error = self._error, None
        if error is not None:
            raise RuntimeError("an analysis figure could not be written") from error
        return done

    def drain(self) -> list[tuple[int, WandbPayload]]:
        """Wait for every submitted job, then return all finished payloads."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.join()
        return self.ready()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._thread = None
