# Run from the repository root: python benchmarks/demo_start.py
"""Times the README's demo command from process start to exit, cold (empty compile cache) then warm."""
import json, subprocess, sys, tempfile, time
sys.path.insert(0, ".")
from jaxinfer.bench.offline import run_header
cmd = ["jaxinfer", "generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "48"]
out = {}
with tempfile.TemporaryDirectory() as cache:
    for kind in ("cold", "warm"):
        t0 = time.perf_counter()
        p = subprocess.run(cmd + ["--compilation-cache-dir", cache], capture_output=True, text=True)
        out[kind] = {"seconds": round(time.perf_counter() - t0, 2), "answer": p.stdout.strip()[-80:], "rc": p.returncode}
rec = {"benchmark": "demo command start to exit", **run_header(["(benchmarks/demo_start.py)"]),
       "command": " ".join(cmd) + " --compilation-cache-dir <fresh temporary directory>, cold then warm, each a new process timed from start to exit",
       "bar_cold_s": 30, "peer": None, "runs": out}
base = "benchmarks/results/demo_command_start_" + rec["platform"] + "_" + rec["date"][:10]
json.dump(rec, open(base + ".json", "w"), indent=1)
open(base + ".md", "w").write("# The README's demo command, process start to exit (2-core CPU)\n\n`" + rec["command"] + "`\n\n| start | seconds | answer |\n|---|---|---|\n" + "".join(f"| {k} | {v['seconds']} | {v['answer']} |\n" for k, v in out.items()))
print(json.dumps(out))
