"""Plots of the tiling sweeps (benchmarks/matmul.py and benchmarks/kernels.py records): one bar
per tiling, the default and XLA marked, so a sweep's spread and winner show at a glance.

  python benchmarks/plot_sweeps.py benchmarks/results/matmul_h200_2026-12-02_t64_sweep.json ...

Writes a PNG beside each JSON (needs matplotlib).
"""

from __future__ import annotations

import json
import os
import sys


def _matmul_panels(record):
    """(title, [(label, TB/s, kind)]) per (shape, tokens) that was swept."""
    panels = {}
    for r in record["rows"]:
        if "tbs" not in r:
            continue
        t = r.get("tiling") or {}
        label = r["impl"] if not t else (f"n{t['block_n']} k{t['block_k']} s{t['split_k']} w{t['num_warps']} "
                                         f"st{t['num_stages']}" + ("" if t.get("swap_ab", True) else " noswap"))
        kind = {"pallas": "default", "pallas_sweep": "swept"}.get(r["impl"], "xla")
        panels.setdefault((r["shape"], r["tokens"]), []).append((label, r["tbs"], kind))
    return [(f"{shape}, T = {tokens}: TB/s of weight reads (kernel time)", bars)
            for (shape, tokens), bars in panels.items() if any(k == "swept" for _, _, k in bars)]


def _ragged_panels(record):
    panels = {}
    for r in record.get("ragged", {}).get("rows", []):
        if "kernel_us" not in r:
            continue
        label = r["name"].split(": ours ", 1)[-1]
        panels.setdefault(r["batch"], []).append((label, r["kernel_us"], "default" if label == "default" else "swept"))
    return [(f"{batch}: kernel us (lower is better)", bars) for batch, bars in panels.items()]


def plot(path: str) -> str:
    sys.path.append(os.environ.get("MATPLOTLIB_SITE", "/tmp/mplsite"))  # after the project's own packages
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        record = json.load(f)
    panels = _matmul_panels(record) if "rows" in record else _ragged_panels(record)
    if not panels:
        raise ValueError(f"{path}: no swept rows to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.2 * len(panels)), squeeze=False)
    fig.subplots_adjust(hspace=1.1)
    colors = {"default": "tab:orange", "swept": "tab:blue", "xla": "tab:gray"}
    for ax, (title, bars) in zip(axes[:, 0], panels):
        ax.bar(range(len(bars)), [v for _, v, _ in bars], color=[colors[k] for _, _, k in bars])
        ax.set_xticks(range(len(bars)), [label for label, _, _ in bars], rotation=70, fontsize=6)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{record.get('device', '')} {record.get('date', '')[:10]}: orange = the table's default, "
                 "gray = XLA, blue = swept", fontsize=9)
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(plot(p))
