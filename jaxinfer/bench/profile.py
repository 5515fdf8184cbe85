"""Where a decode step's time goes on the device: a profiler trace of engine steps.

From the trace's device lines (CUPTI activity on GPUs) it reports the kernels' busy time (the
union of their intervals), the share of wall time no kernel runs (device idle: host work,
launch gaps, syncs), and the kernels that take the most time.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time

LONG_GAP_NS = 20_000  # idle stretches longer than this are not launch gaps


def _device_events(path: str):
    import jax

    data = jax.profiler.ProfileData.from_file(path)
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            # GPU kernels sit on "Stream" lines (memcpys too); TPU ops on "XLA Ops".
            if not (line.name.startswith("Stream") or line.name == "XLA Ops"):
                continue
            for e in line.events:
                yield e.name, e.start_ns, e.duration_ns


def profile_steps(step, num_steps: int) -> dict:
    """Runs `step()` num_steps times inside a profiler trace; returns the device's busy and
    idle shares of the wall time and the top kernels by time (None fields off accelerators)."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            t0 = time.perf_counter()
            for _ in range(num_steps):
                step()
            wall = time.perf_counter() - t0
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        events = list(_device_events(paths[0])) if paths else []
    out = {"steps": num_steps, "wall_s_per_step": wall / num_steps}
    if not events:
        out["device_busy_fraction"] = None
        return out
    intervals = sorted((start, start + dur) for _, start, dur in events)
    busy, end, gaps = 0, None, []
    for s, e in intervals:  # union of intervals: concurrent kernels count once
        if end is None or s > end:
            if end is not None:
                gaps.append(s - end)
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    # Idle splits into launch gaps between a step's kernels and long gaps (host work between
    # steps, or a launch queue run dry).
    long_gaps = [g for g in gaps if g > LONG_GAP_NS]
    span = intervals[-1][1] - intervals[0][0]
    by_name = collections.Counter()
    counts = collections.Counter()
    for name, _, dur in events:
        key = re.sub(r"[._]\d+$", "", name)
        by_name[key] += dur
        counts[key] += 1
    out.update(device_span_s=span / 1e9, device_busy_s=busy / 1e9, device_busy_fraction=busy / span,
               device_idle_fraction=1 - busy / span, kernels_per_step=len(events) / num_steps,
               idle_us_per_step_in_long_gaps=sum(long_gaps) / 1e3 / num_steps,
               long_gaps_per_step=len(long_gaps) / num_steps,
               idle_us_per_step_in_short_gaps=(sum(gaps) - sum(long_gaps)) / 1e3 / num_steps,
               top_kernels=[{"name": k[:120], "us_per_step": v / 1e3 / num_steps, "calls_per_step":
                             counts[k] / num_steps} for k, v in by_name.most_common(15)])
    return out


def cprofile_top(fn, num_steps: int, top: int = 12) -> list[dict]:
    """Runs fn() once under cProfile: the functions with the most own time, per step (their
    times inflated by the profiler; compare them with each other)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    return [{"function": f"{os.path.basename(f)}:{line}({name})", "calls_per_step": calls / num_steps,
             "own_ms_per_step": own / num_steps * 1e3, "cumulative_ms_per_step": cum / num_steps * 1e3}
            for (f, line, name), (_, calls, own, cum, _) in rows]


def host_profile(step, num_steps: int, top: int = 12) -> dict:
    """How much of a step is the host's own work: steps timed with the waits for the device
    summed apart, then one more round under cProfile for the functions that cost the most."""
    with device_waits() as waits:
        t0 = time.perf_counter()
        for _ in range(num_steps):
            step()
        wall = time.perf_counter() - t0
    waited = waits.seconds()

    def more_steps():
        for _ in range(num_steps):
            step()

    return {"steps": num_steps, "wall_ms_per_step": wall / num_steps * 1e3,
            "host_ms_per_step": (wall - waited) / num_steps * 1e3,
            "wait_ms_per_step": waited / num_steps * 1e3,
            "top_functions_profiled": cprofile_top(more_steps, num_steps, top)}


class HostTimeline:
    """Records when chosen methods start and end on the host while active: (name, start,
    end) in seconds. targets: (owner class, method name) pairs."""

    def __init__(self, targets):
        self.targets = list(targets)
        self.events: list[tuple[str, float, float]] = []
        self._saved = []

    def __enter__(self) -> "HostTimeline":
        for owner, name in self.targets:
            original = getattr(owner, name)
            self._saved.append((owner, name, original))

            def timed(*args, _original=original, _label=f"{owner.__name__}.{name}", **kwargs):
                t = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.events.append((_label, t, time.perf_counter()))

            setattr(owner, name, timed)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)

    def seconds(self) -> float:
        """Time spent in all the recorded calls."""
        return sum(e - s for _, s, e in self.events)

    def summary(self, window: tuple[int, int] = (10, 14)) -> dict:
        """Mean ms and calls per method, and the events of steps window[0]..window[1] (counted
        by `LLMEngine.step` calls) as offsets in ms from the first of them."""
        per = collections.defaultdict(list)
        for name, s, e in self.events:
            per[name].append(e - s)
        steps = sorted(s for name, s, _ in self.events if name.endswith(".step"))
        out = {"mean_ms": {k: 1e3 * sum(v) / len(v) for k, v in per.items()},
               "calls": {k: len(v) for k, v in per.items()}}
        if len(steps) > window[1]:
            lo, hi = steps[window[0]], steps[window[1]]
            out["window"] = [(name, round(1e3 * (s - lo), 3), round(1e3 * (e - lo), 3))
                             for name, s, e in sorted(self.events, key=lambda x: x[1]) if lo <= s < hi]
        return out


def device_waits() -> HostTimeline:
    """A timeline of the host's waits for the device (`PendingStep.result`) alone: what is
    left of a timed stretch is the host's own work."""
    from jaxinfer.engine import runner

    return HostTimeline([(runner.PendingStep, "result")])
