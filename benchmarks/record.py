"""What every benchmark record shares: the header (what ran it, where and when), the common
command-line options of the kernel benchmarks, and saving the record as it grows."""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxinfer.bench.offline import run_header as offline_run_header


def run_header() -> dict:
    """Device, versions, UTC date and the command line of this run."""
    header = offline_run_header()
    header["command"] = "PYTHONPATH=. python " + " ".join(sys.argv)
    return header


def kernel_bench_parser(description: str, *, iters: int) -> argparse.ArgumentParser:
    """The options every kernel benchmark takes; scripts add their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny shapes in interpret mode (CPU)")
    parser.add_argument("--sweep", action="store_true", help="also time a sweep of tilings")
    parser.add_argument("--iters", type=int, default=iters, help="back-to-back calls per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sets", type=int, default=2, help="input sets rotated between calls")
    return parser


def report_saver(report: dict, out_dir: str, filename: str):
    """A function writing `report` as JSON to out_dir/filename, for calling after every stage so
    that a run cut short still leaves its numbers."""
    os.makedirs(out_dir, exist_ok=True)

    def save():
        with open(os.path.join(out_dir, filename), "w") as f:
            json.dump(report, f, indent=1)

    return save


def close_report(report: dict, save, out_dir: str, name: str, markdown: str, seconds: float) -> int:
    """Ends a kernel benchmark: its duration saved with the record, the markdown table written
    beside it (out_dir/name.md) and printed; exit status 1 if any row failed its check."""
    report["seconds"] = seconds
    save()
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    return 1 if any(r.get("ok") is False for r in report["rows"]) else 0
