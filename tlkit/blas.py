"""Small convex fits run with one BLAS thread (bottom of the import graph).

Measured on this project's 2-core machine: scikit-learn's L-BFGS logistic regression on
180 x 1280 features took 2.9 s with OpenBLAS's 2 threads while TensorFlow's thread pools
shared the cores, and 0.15 s with one thread (the problems are far too small to gain from
threads, and spinning BLAS threads fight TensorFlow's). The baselines, the probe and the head
solver therefore fit inside :func:`one_blas_thread`.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def one_blas_thread() -> threadpool_limits:
    """A context manager limiting BLAS (OpenBLAS / MKL) to one thread while it is active."""
    return threadpool_limits(limits=1, user_api="blas")
