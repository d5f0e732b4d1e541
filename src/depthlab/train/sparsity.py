"""Implicit-sparsity statistics during training: weight sparsity (SPEC §5.6) and attention sparsity (SPEC §5.7).

The formulas and their key names are `depthlab.measures`, shared with `depthlab analyze`; this module only collects
them for layer_stats.jsonl, one dict per block with a single host sync each:

- `weight_sparsity_by_block`: ``{"weight_sparsity": {matrix: {frac_below_rel_0.001, frac_below_rel_0.01,
  frac_below_abs_0.001, hoyer}}}`` for every matrix type of the block (`measures.matrices`).
- `attention_sparsity_by_layer`: the head means ``attn_<key>`` of `measures.ATTENTION_KEYS` and the per-head
  ``attn_entropy_heads``, from a separate no-grad pass over a fixed probe batch through `Attention.probabilities`,
  so training itself keeps fused SDPA.
"""

from __future__ import annotations

import torch
from torch import nn

from depthlab import measures

ATTENTION_PROBE_SEQUENCES = 4
"""Sequences in the fixed probe batch; each is run alone, so memory is one [H,T,T] fp32 map per layer."""


@torch.no_grad()
def weight_sparsity_by_block(model: nn.Module) -> list[dict]:
    """``[{"weight_sparsity": {matrix type: {stat: value}}}, …]`` per block, with one host sync in total."""
    per_block = [{name: measures.weight_sparsity(w) for name, w in measures.matrices(b).items()}
                 for b in model.blocks]
    flat = [v for block in per_block for stats in block.values() for v in stats.values()]
    values = iter(torch.stack(flat).tolist())
    return [{"weight_sparsity": {name: {k: next(values) for k in stats} for name, stats in block.items()}}
            for block in per_block]


@torch.no_grad()
def attention_sparsity_by_layer(model: nn.Module, probe: torch.Tensor) -> list[dict]:
    """Per block: head means of the §5.7 statistics of its attention on the probe batch (token ids [N,T]), plus the
    per-head entropies. Each block's attention input is captured by a forward hook, whatever the norm placement."""
    sums: list[dict[str, torch.Tensor]] = [{} for _ in model.blocks]

    def capture(index):
        def hook(module, args, _output):
            sums[index] = measures.add_sums(sums[index], measures.attention_sums(module.probabilities(args[0])))
        return hook

    hooks = [b.attn.register_forward_hook(capture(i)) for i, b in enumerate(model.blocks)]
    was_training = model.training
    model.eval()
    try:
        for seq in probe:
            model(seq[None])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    means = [measures.attention_means(s) for s in sums]
    packed = torch.stack([torch.stack([m[k] for k in measures.ATTENTION_KEYS]) for m in means])  # [L, stats, H]
    out = []
    for per_layer in packed.tolist():
        stats = dict(zip(measures.ATTENTION_KEYS, per_layer))
        entry = {f"attn_{k}": sum(v) / len(v) for k, v in stats.items()}
        entry["attn_entropy_heads"] = stats["entropy"]
        out.append(entry)
    return out
