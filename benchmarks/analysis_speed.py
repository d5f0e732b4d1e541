"""depthlab's analysis engine vs naive full-forward implementations of the same definitions (not a test).

Naive = what prior research code did: one full forward pass per intervention with the block list edited (for
usefulness: a hooked pass over the fit sample collecting every block's input and output, then one full pass over
the evaluation sample per replaced block). Same model, tokens and dtype; results are asserted identical; time
(best of --repeat after a warm-up) and peak RSS growth are reported. depthlab's usefulness time includes its pass
over the separate fit sample (default 32·(d+1) tokens, disjoint from the evaluation sample) and its fit-variance
jackknife.

    .venv/bin/python benchmarks/analysis_speed.py --num-samples 32 --seq-len 256      # the documented setting
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

from depthlab import load_model
from depthlab.analysis import causal_effects, jacobian, permutation_scores, usefulness
from depthlab.analysis.defaults import default_fit_samples
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


def timed(fn, repeat):
    fn()  # warm-up
    best, rss0 = float("inf"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024


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
    args = p.parse_args()
    model, tok = load_model(args.model, dtype=args.dtype)
    fit_samples = args.fit_samples or default_fit_samples(ModelView(model).d_model, args.seq_len)
    ids, fit_ids, _ = calibration_samples(tok, None, args.num_samples, args.seq_len, fit_samples, seed=args.seed)
    mb = args.num_samples
    rows = []
    wanted = args.metrics.split(",")
    if "usefulness" in wanted:
        ours, t1, m1 = timed(lambda: usefulness(model, ids, fit_ids=fit_ids, bootstrap=0,
                                                micro_batch_size=mb).loss_ratios, args.repeat)
        ref, t0, m0 = timed(lambda: naive_usefulness(model, ids, fit_ids), args.repeat)
        gap = max(abs(a - b) for a, b in zip(ours, ref))
        print(f"usefulness (fit {fit_ids.shape[0]}x{fit_ids.shape[1]}, eval {ids.shape[0]}x{ids.shape[1]}): "
              f"max |ratio - naive| {gap:.2e}; useful (tau 0.1) depthlab {[l for l, r in enumerate(ours) if r > 1.1]}"
              f", naive {[l for l, r in enumerate(ref) if r > 1.1]}")
        assert torch.allclose(torch.tensor(ours), torch.tensor(ref), rtol=1e-4), "usefulness differs"
        rows.append(("usefulness (incl. fit sample)", t0, t1, m0, m1))
    if "causal" in wanted:
        ours, t1, m1 = timed(lambda: causal_effects(model, ids, micro_batch_size=mb).matrix, args.repeat)
        ref, t0, m0 = timed(lambda: naive_causal(model, ids), args.repeat)
        assert torch.allclose(torch.tensor(ours, dtype=torch.float64).nan_to_num(), ref.nan_to_num(), rtol=1e-4)
        rows.append(("causal", t0, t1, m0, m1))
    if "permutation" in wanted:
        L = ModelView(model).n_layers
        pairs = [(a, a + 1) for a in range(L - 1)]
        ours, t1, m1 = timed(lambda: permutation_scores(model, ids, pairs="adjacent", micro_batch_size=mb).scores,
                             args.repeat)
        ref, t0, m0 = timed(lambda: naive_permutation(model, ids, pairs), args.repeat)
        assert torch.allclose(torch.tensor(ours), torch.tensor(ref), rtol=1e-3, atol=1e-6), "permutation differs"
        rows.append(("permutation (adjacent)", t0, t1, m0, m1))
    if "jacobian" in wanted:
        layers = [int(x) for x in args.jacobian_layers.split(",")]
        exact, t0, m0 = timed(lambda: jacobian(model, ids, mode="exact", layers=layers, micro_batch_size=mb),
                              args.repeat)
        est, t1, m1 = timed(lambda: jacobian(model, ids, mode="estimate", probes=16, power_iters=4, layers=layers,
                                             micro_batch_size=mb), args.repeat)
        err = max(abs(e["jacobian_norm"] - x["jacobian_norm"]) / x["jacobian_norm"]
                  for e, x in zip(est.layers, exact.layers))
        rows.append((f"jacobian estimate vs exact (max rel. err {err:.1%})", t0, t1, m0, m1))
    print("| metric | naive / exact s | depthlab s | speed-up | peak RSS growth MiB (naive, depthlab) |")
    print("|---|---|---|---|---|")
    for name, t0, t1, m0, m1 in rows:
        print(f"| {name} | {t0:.1f} | {t1:.1f} | {t0 / t1:.2f}x | {m0:.0f}, {m1:.0f} |")


if __name__ == "__main__":
    main()
