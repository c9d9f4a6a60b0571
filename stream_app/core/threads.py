"""Process-wide thread limits for the serving and worker processes."""

from __future__ import annotations

import os

from threadpoolctl import threadpool_limits


def limit_blas_threads(n: int = 1) -> None:
    """Make BLAS use `n` threads in this process (before or after numpy is imported): servers and
    workers get their parallelism from processes, and on a small, busy machine a multi-threaded
    BLAS spends a short mat-vec spinning its threads."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)  # for a BLAS loaded later
    threadpool_limits(n, user_api="blas")  # for the one loaded now
