"""BLAS held to one thread where the work is many small products: a context (threadpoolctl).

Numerics layer. Per-weight work (every executor's task, execution.parallel.call) and the many small solves of
the layer refits run faster on one BLAS thread: a BLAS thread pool spins between small calls, which on the
3 GB stack cost 61 of 132 CPU s and 11 of 83 s wall at --jobs 1, and oversubscribes the cores under --jobs N.
Thread counts do not change the results here (the same output bytes, measured).
"""
from __future__ import annotations

import contextlib

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # declared, but a missing one only costs speed: BLAS keeps its own thread count
    ThreadpoolController = None
_controller = None


def one_blas_thread():
    """A context holding BLAS to one thread. The controller finds the BLAS libraries once: finding
    them on every call (threadpool_limits) reads /proc/self/maps each time, which cost more than
    the tens of thousands of small solves of a depthwise layer's refits."""
    global _controller
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=1)
