"""Reliability of a training job: exact resume, atomic checkpoints, NaN/Inf handling, failure records, sweep summary.

``resume``     RNG / SR / data-position state in checkpoints, ``last.ckpt``, which checkpoint a job resumes
``files``      atomic file writes (temp file + fsync + rename), disk errors as one ``StorageError``
``storage``    ``AtomicCheckpointIO``: Lightning's checkpoint writer on top of ``files``
``nonfinite``  stop or skip on a NaN/Inf loss or gradient, naming the step and the first layer
``failures``   ``failure.json`` and the user-facing message of a failed job
``multirun``   Hydra callback: ``<sweep dir>/jobs.json`` and the list of failed jobs

docs/failures.md says what happens in each case; the W&B guard lives with the loggers (``trainers/loggers.py``).
"""
