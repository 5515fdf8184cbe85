"""CPU seconds of a process and its descendants, as JSON {pid: [cpu_s, command]}, from /proc.

  python3 benchmarks/device/proc_cpu.py PID > before.json; ...; python3 benchmarks/device/proc_cpu.py PID \
      --since before.json --wall SECONDS

With --since and --wall it prints each process's share of one core over that interval instead
(1.0: a core busy all the time), which tells whether the API server's event loop or the
engine process is the bound of a serving run.
"""

from __future__ import annotations

import argparse
import json
import os


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _command(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> dict[str, list]:
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        try:
            found[str(p)] = [_cpu_s(p), _command(p)]
            todo += _children(p)
        except OSError:  # it ended meanwhile
            continue
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("--since", help="an earlier output of this script")
    parser.add_argument("--wall", type=float, help="seconds between the two readings")
    args = parser.parse_args()
    now = tree(args.pid)
    if args.since:
        with open(args.since) as f:
            before = json.load(f)
        now = {pid: {"core_share": round((cpu - before.get(pid, [0.0])[0]) / args.wall, 3), "command": cmd}
               for pid, (cpu, cmd) in now.items()}
    print(json.dumps(now))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
