"""depthlab's analysis engine vs naive full-forward implementations of the same definitions (not a test).

Naive = what prior research code did: one full forward pass per intervention with the block list edited (for
usefulness: a hooked pass over the fit sample collecting every block's input and output, then one full pass over
the evaluation sample per replaced block). Same model, tokens and dtype; results are asserted identical. Each side
is warmed up on a small slice (the first sequence, 16 tokens), then depthlab and naive alternate --repeat times;
the best time of each and the process's peak RSS during each side's timed runs (sampled every 20 ms) are reported,
with the load average before and after every metric: a run beside other jobs is not a measurement, and only the
ratios of one run compare. depthlab's usefulness time includes its pass over the separate fit sample (default
32·(d+1) tokens, disjoint from the evaluation sample) and its fit-variance jackknife.

    .venv/bin/python benchmarks/analysis_speed.py --num-samples 32 --seq-len 256      # the documented setting
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time

import torch
from torch import nn

from depthlab import load_model
from depthlab.analysis import causal_effects, jacobian, permutation_scores, usefulness
from depthlab.analysis.defaults import default_fit_samples
from depthlab.analysis.engine import RESUME_TOKENS, Engine
from depthlab.data import calibration_samples
from depthlab.model.view import ModelView


class Replace(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h, *args, **kwargs):
        return self.fn(h)


def run_with(model, blocks, ids, hooks=()):
    """Full forward with the block list replaced; returns (mean NLL, per-block inputs and outputs)."""
    stack = ModelView(model)
    original = list(stack.blocks)
    for i, b in enumerate(blocks):
        stack.blocks[i] = b
    ins, outs = {}, {}

    def capture(i):
        def hook(module, args, kwargs, out):  # returns None: the block's output is left unchanged
            ins[i] = args[0] if args else kwargs["hidden_states"]
            outs[i] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [b.register_forward_hook(capture(i), with_kwargs=True)
               for i, b in enumerate(stack.blocks)] if hooks else []
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
    finally:
        for h in handles:
            h.remove()
        for i, b in enumerate(original):
            stack.blocks[i] = b
    return nll, ins, outs


def naive_usefulness(model, ids, fit_ids, chunk: int = 8):
    """Maps fitted on fit_ids (hooked full forwards of `chunk` sequences, fp64 normal equations, a plain solve),
    each evaluated by a full forward of ids with the block list edited."""
    blocks = list(ModelView(model).blocks)
    base, _, _ = run_with(model, blocks, ids)
    xtx, xty = {}, {}
    for i in range(0, len(fit_ids), chunk):  # the collection passes over the fit sample
        _, ins, outs = run_with(model, blocks, fit_ids[i:i + chunk], hooks=True)
        for l in range(len(blocks)):
            x = ins[l].reshape(-1, ins[l].shape[-1]).double()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
            xtx[l] = xtx.get(l, 0) + x.T @ x
            xty[l] = xty.get(l, 0) + x.T @ outs[l].reshape(x.shape[0], -1).double()
    ratios = []
    for l in range(len(blocks)):
        coef = torch.linalg.solve(xtx[l], xty[l])
        edited = list(blocks)
        edited[l] = Replace(lambda h, w=coef[:-1], b=coef[-1]: (h.double() @ w + b).to(h.dtype))
        ratios.append(run_with(model, edited, ids)[0] / base)
    return ratios


def naive_causal(model, ids):
    blocks = list(ModelView(model).blocks)
    L = len(blocks)
    _, ins, outs = run_with(model, blocks, ids, hooks=True)
    delta = [outs[l] - ins[l] for l in range(L)]
    C = torch.full((L, L), float("nan"), dtype=torch.float64)
    for s in range(L):
        edited = list(blocks)
        edited[s] = Replace(lambda h: h)
        _, i2, o2 = run_with(model, edited, ids, hooks=True)
        for l in range(s + 1, L):
            C[s, l] = ((o2[l] - i2[l]) - delta[l]).float().norm(dim=-1).double().sum() / \
                delta[l].float().norm(dim=-1).double().sum()
    return C


def naive_permutation(model, ids, pairs):
    blocks = list(ModelView(model).blocks)
    base = run_with(model, blocks, ids)[0]
    scores = []
    for a, b in pairs:
        edited = list(blocks)
        edited[a], edited[b] = edited[b], edited[a]
        scores.append(abs(run_with(model, edited, ids)[0] - base) / base)
    return scores


class PeakRSS:
    """The process's peak resident memory (MiB) while the block runs, sampled from /proc every 20 ms (ru_maxrss,
    the lifetime peak, where /proc is missing)."""

    def __enter__(self):
        self.peak, self._stop = rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def side_by_side(ours, naive, sample, warm, repeat):
    """Warm both up on `warm`, then alternate them `repeat` times on `sample`: (outputs, best seconds, peak MiB)
    for depthlab and naive."""
    ours(*warm), naive(*warm)
    out, best, peak = [None, None], [float("inf")] * 2, [0.0, 0.0]
    for _ in range(repeat):
        for i, fn in enumerate((ours, naive)):
            with PeakRSS() as rss:
                t = time.perf_counter()
                out[i] = fn(*sample)
                best[i] = min(best[i], time.perf_counter() - t)
            peak[i] = max(peak[i], rss.peak)
    return out, best, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--fit-samples", type=int, default=None, help="usefulness fit sequences (default: 32*(d+1) tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--metrics", default="usefulness,causal,permutation,jacobian")
    p.add_argument("--jacobian-layers", default="0,15,29", help="layers for exact-vs-estimate (exact is d VJPs)")
    p.add_argument("--resume-tokens", type=int, default=RESUME_TOKENS,
                   help="depthlab's Engine.resume_tokens (tokens per stacked block call; 0: one call per intervention)")
    args = p.parse_args()
    model, tok = load_model(args.model, dtype=args.dtype)
    fit_samples = args.fit_samples or default_fit_samples(ModelView(model).d_model, args.seq_len)
    ids, fit_ids, _ = calibration_samples(tok, None, args.num_samples, args.seq_len, fit_samples, seed=args.seed)
    mb = args.num_samples
    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {load()} (1/5/15 min)")
    warm = (ids[:1, :16], fit_ids[:3, :16])

    def engine(x):
        return Engine(model, x, micro_batch_size=mb, resume_tokens=args.resume_tokens)

    rows = []
    wanted = args.metrics.split(",")
    if "usefulness" in wanted:
        (ours, ref), (t1, t0), (m1, m0) = side_by_side(
            lambda x, f: usefulness(model, x, fit_ids=f, bootstrap=0, micro_batch_size=mb,
                                    engine=engine(x)).loss_ratios,
            lambda x, f: naive_usefulness(model, x, f), (ids, fit_ids), warm, args.repeat)
        gap = max(abs(a - b) for a, b in zip(ours, ref))
        print(f"usefulness (fit {fit_ids.shape[0]}x{fit_ids.shape[1]}, eval {ids.shape[0]}x{ids.shape[1]}): "
              f"max |ratio - naive| {gap:.2e}; useful (tau 0.1) depthlab {[l for l, r in enumerate(ours) if r > 1.1]}"
              f", naive {[l for l, r in enumerate(ref) if r > 1.1]}")
        assert torch.allclose(torch.tensor(ours), torch.tensor(ref), rtol=1e-4), "usefulness differs"
        rows.append(("usefulness (incl. fit sample)", t0, t1, m0, m1, load()))
    if "causal" in wanted:
        (ours, ref), (t1, t0), (m1, m0) = side_by_side(
            lambda x: causal_effects(model, x, engine=engine(x)).matrix, lambda x: naive_causal(model, x),
            (ids,), warm[:1], args.repeat)
        assert torch.allclose(torch.tensor(ours, dtype=torch.float64).nan_to_num(), ref.nan_to_num(), rtol=1e-4)
        rows.append(("causal", t0, t1, m0, m1, load()))
    if "permutation" in wanted:
        L = ModelView(model).n_layers
        pairs = [(a, a + 1) for a in range(L - 1)]
        (ours, ref), (t1, t0), (m1, m0) = side_by_side(
            lambda x: permutation_scores(model, x, pairs="adjacent", engine=engine(x)).scores,
            lambda x: naive_permutation(model, x, pairs), (ids,), warm[:1], args.repeat)
        assert torch.allclose(torch.tensor(ours), torch.tensor(ref), rtol=1e-3, atol=1e-6), "permutation differs"
        rows.append(("permutation (adjacent)", t0, t1, m0, m1, load()))
    if "jacobian" in wanted:
        layers = [int(x) for x in args.jacobian_layers.split(",")]
        (est, exact), (t1, t0), (m1, m0) = side_by_side(
            lambda x: jacobian(model, x, mode="estimate", probes=16, power_iters=4, layers=layers,
                               micro_batch_size=mb),
            lambda x: jacobian(model, x, mode="exact", layers=layers, micro_batch_size=mb), (ids,), warm[:1],
            args.repeat)
        err = max(abs(e["jacobian_norm"] - x["jacobian_norm"]) / x["jacobian_norm"]
                  for e, x in zip(est.layers, exact.layers))
        rows.append((f"jacobian estimate vs exact (max rel. err {err:.1%})", t0, t1, m0, m1, load()))
    print(f"load average after: {load()}")
    print("| metric | naive / exact s | depthlab s | speed-up | peak RSS MiB (naive, depthlab) | load after |")
    print("|---|---|---|---|---|---|")
    for name, t0, t1, m0, m1, after in rows:
        print(f"| {name} | {t0:.1f} | {t1:.1f} | {t0 / t1:.2f}x | {m0:.0f}, {m1:.0f} | {after} |")


if __name__ == "__main__":
    main()
