"""Counts JAX compilations, so tests and the engine can assert none happen after warm-up."""

from __future__ import annotations

import contextlib
import threading

import jax

# A trace is emitted once per function traced for a new shape/static-arg signature; counting
# traces also catches cache hits of the persistent compilation cache, which still mean an
# unexpected shape reached the hot path. A backend compile without a new trace happens when
# only an argument's placement differs (e.g. a committed vs an uncommitted array): counted too.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


class CompileCounter:
    """Context manager counting traces started inside it (all threads)."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def _listener(self, event: str, duration: float, **kwargs):
        if event in _COMPILE_EVENTS:
            with self._lock:
                self.count += 1

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_duration_listener(self._listener)
        return False
