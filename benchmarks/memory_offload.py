"""Peak memory of `depthlab analyze` vs sample size, the largest model analysed here, and what disk offload costs.

Every configuration runs in its own process, so each peak RSS (``provenance.memory`` in results.json, loading
included) is that configuration's alone. Memory does not depend on machine load; the offload *time* is reported
as a ratio of two runs back to back on the same machine (state the load, e.g. with ``uptime``, next to it).

    flock /tmp/depthlab-heavy.lock .venv/bin/python benchmarks/memory_offload.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEPTHLAB = [sys.executable, "-m", "depthlab"]
ONE_B = """
import sys, torch
from depthlab.analysis.suite import analyze
from depthlab.config import load_config
from depthlab.model.transformer import Transformer
from depthlab.provenance import peak_memory
cfg = load_config("paper-1b").model
torch.manual_seed(0)
with torch.no_grad():
    model = Transformer(cfg).eval()
params = sum(p.numel() for p in model.parameters())
ids = torch.randint(0, cfg.vocab_size, (int(sys.argv[1]), int(sys.argv[2])))
analyze(model, ids, ["variance", "angular", "permutation"], options={"permutation": {"pairs": "adjacent"}})
print(params, peak_memory()["peak_rss_bytes"])
"""


def analyze(out: Path, n: int, t: int, metrics: str, *extra: str) -> tuple[int, float, dict]:
    """Peak RSS (bytes), wall seconds and the results of one `depthlab analyze smollm2` run."""
    start = time.perf_counter()
    subprocess.run([*DEPTHLAB, "analyze", "smollm2", "--metrics", metrics, "--num-samples", str(n), "--seq-len",
                    str(t), "--device", "cpu", "--dtype", "fp32", "-q", "--out", str(out), *extra],
                   check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    return results["provenance"]["memory"]["peak_rss_bytes"], seconds, results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-1b", action="store_true")
    args = p.parse_args()
    gib = 2**30
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("| SmolLM2-135M, metrics variance,angular | sample | cache budget | peak RSS |")
        for n, t, budget in ((8, 128, "2GiB"), (16, 256, "2GiB"), (32, 256, "2GiB"), (16, 256, "0")):
            rss, _, _ = analyze(root / f"s{n}x{t}{budget}", n, t, "variance,angular", "--cache-budget", budget,
                                "--micro-batch-size", "8")
            print(f"| | {n}x{t} | {budget} | {rss / gib:.2f} GiB |")
        n, t = 2, 32
        print(f"\n| SmolLM2-135M, {n}x{t}, variance,permutation (adjacent) | placement | peak RSS | permutation time |")
        rows = {}
        for name, extra in (("in memory", ()),
                            ("blocks on disk", ("--device-map", "auto", "--max-memory", "cpu=150MiB",
                                                "--offload-folder", str(root / "offload")))):
            rss, _, results = analyze(root / name.replace(" ", "_"), n, t, "variance,permutation", *extra)
            seconds = results["metrics"]["permutation"]["seconds"]
            L = results["model"]["n_layers"]
            evals = sum(L - a for a in range(L - 1))  # the swap of (a, a+1) resumes from block a
            rows[name] = seconds
            on_disk = sum(v == "disk" for v in results["provenance"].get("device_map", {}).values())
            print(f"| | {name} ({on_disk} modules on disk) | {rss / gib:.2f} GiB | {seconds:.1f} s = {evals} "
                  f"block evaluations x {1e3 * seconds / evals:.0f} ms |")
        print(f"offload time ratio: {rows['blocks on disk'] / rows['in memory']:.2f}x")
    if not args.skip_1b:
        out = subprocess.run([sys.executable, "-c", ONE_B, "1", "32"], check=True, capture_output=True, text=True)
        params, rss = map(int, out.stdout.split()[-2:])
        print(f"\npaper-1b random weights ({params / 1e9:.2f}B params, fp32), 1x32 tokens, variance,angular,"
              f"permutation (adjacent pairs): peak RSS {rss / gib:.2f} GiB")


if __name__ == "__main__":
    main()
