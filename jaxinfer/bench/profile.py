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


def host_profile(step, num_steps: int, top: int = 12) -> dict:
    """How much of a step is the host's own work: steps timed with the waits for the device
    (`PendingStep.result`) summed apart, then one more round under cProfile for the functions
    that cost the most (their times inflated by the profiler; compare them with each other)."""
    import cProfile
    import pstats

    from jaxinfer.engine import runner

    waited = 0.0
    result = runner.PendingStep.result

    def timed_result(self):
        nonlocal waited
        t = time.perf_counter()
        try:
            return result(self)
        finally:
            waited += time.perf_counter() - t

    runner.PendingStep.result = timed_result
    try:
        t0 = time.perf_counter()
        for _ in range(num_steps):
            step()
        wall = time.perf_counter() - t0
        waited_timed = waited
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(num_steps):
            step()
        profiler.disable()
    finally:
        runner.PendingStep.result = result
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    return {"steps": num_steps, "wall_ms_per_step": wall / num_steps * 1e3,
            "host_ms_per_step": (wall - waited_timed) / num_steps * 1e3,
            "wait_ms_per_step": waited_timed / num_steps * 1e3,
            "top_functions_profiled": [{"function": f"{os.path.basename(f)}:{line}({name})", "calls_per_step":
                                        calls / num_steps, "own_ms_per_step": own / num_steps * 1e3,
                                        "cumulative_ms_per_step": cum / num_steps * 1e3}
                                       for (f, line, name), (_, calls, own, cum, _) in rows]}
