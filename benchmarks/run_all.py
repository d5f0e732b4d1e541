"""`make bench`: every CPU benchmark, one at a time, each framed by the machine's load average.

    .venv/bin/python benchmarks/run_all.py [--only analysis_speed,train_throughput] [--out benchmarks/out]

A benchmark counts only when it ran alone, so each is preceded and followed by the 1-minute load average
(os.getloadavg); a load above the core count is flagged beside the table. Each benchmark's stdout (a Markdown
table) is printed and, with --out, saved as <name>.md. The GPU check is separate: benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {  # name → arguments (each script documents its own)
    "analysis_speed": ["--model", "smollm2", "--num-samples", "32", "--seq-len", "256"],
    "train_throughput": [],
    "moe_speed": [],
    "eval_speed": ["--model", "smollm2", "--tasks", "piqa,arc_easy", "--limit", "200"],
    "cpu_bf16": [],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset, in this order")
    p.add_argument("--out", type=Path, default=None, help="folder for one <name>.md per benchmark")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"run_all.py: error: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    cores = os.cpu_count() or 1
    failed = []
    for name in names:
        before = os.getloadavg()[0]
        done = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *BENCHMARKS[name]], check=False,
                              capture_output=True, text=True)
        after = os.getloadavg()[0]
        busy = " (machine busy: not a measurement)" if max(before, after) > cores else ""
        text = (f"## {name}\n\nload average (1 min) before {before:.2f}, after {after:.2f} on {cores} cores{busy}\n\n"
                f"{done.stdout}")
        if done.returncode:
            failed.append(name)
            text += f"\nFAILED (exit {done.returncode}):\n{done.stderr[-2000:]}\n"
        print(text, flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.md").write_text(text)
    if failed:
        sys.exit(f"run_all.py: {len(failed)} benchmark(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
