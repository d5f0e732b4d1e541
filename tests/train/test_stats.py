import torch

from depthlab.config import ModelConfig
from depthlab.model.transformer import Transformer
from depthlab.train.stats import LayerStats


def test_stats_equal_direct_computation_on_captured_tensors():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, seq_len=8, norm="peri")).eval()
    ids = torch.randint(0, 40, (3, 8))
    captured = {}
    # Capture block inputs/outputs with hooks, independently of the stats path.
    hooks = [b.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, (inp[0], out)))
             for i, b in enumerate(m.blocks)]
    stats = LayerStats(3, torch.device("cpu"), moments=True)
    with stats.attached(m), torch.no_grad():
        # two micro-batches: sums must combine exactly
        m(ids[:1])
        first = {i: v for i, v in captured.items()}
        m(ids[1:])
    for h in hooks:
        h.remove()
    result = stats.finish()
    assert result["sample_tokens"] == 24
    for i, layer in enumerate(result["layers"]):
        out = torch.cat([first[i][1], captured[i][1]])
        x = torch.cat([first[i][0], captured[i][0]])
        assert abs(layer["out_var"] - out.var(-1, unbiased=False).mean().item()) < 1e-5
        # peri: the branch outputs are RMS-normed with unit weights: per-token norm at most sqrt(d) (less where eps dominates)
        assert 0 < layer["attn_norm"] <= 4.0 + 1e-4 and 0 < layer["ffn_norm"] <= 4.0 + 1e-4
        z = (out - out.mean(-1, keepdim=True)) / out.std(-1, unbiased=False, keepdim=True)
        assert abs(layer["out_kurtosis"] - z.pow(4).mean().item()) < 1e-4
        assert (out - x).norm(dim=-1).mean().item() > 0
    with torch.no_grad():
        final = m.norm(torch.cat([first[2][1], captured[2][1]]))
    assert abs(result["final_norm_var"] - final.var(-1, unbiased=False).mean().item()) < 1e-5
    assert all(not mod._forward_hooks for mod in m.modules())  # only the two test hooks were left, now removed


def test_branch_stats_are_the_branches_not_the_stream():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, seq_len=8)).eval()
    ids = torch.randint(0, 40, (2, 8))
    branch = {}
    hooks = [m.blocks[0].attn.register_forward_hook(lambda mod, i, o: branch.__setitem__("attn", o)),
             m.blocks[0].ffn.register_forward_hook(lambda mod, i, o: branch.__setitem__("ffn", o))]
    stats = LayerStats(2, torch.device("cpu"))
    with stats.attached(m), torch.no_grad():
        m(ids)
    for h in hooks:
        h.remove()
    layer = stats.finish()["layers"][0]
    assert abs(layer["attn_var"] - branch["attn"].var(-1, unbiased=False).mean().item()) < 1e-6
    assert abs(layer["ffn_var"] - branch["ffn"].var(-1, unbiased=False).mean().item()) < 1e-6
    assert abs(layer["ffn_norm"] - branch["ffn"].norm(dim=-1).mean().item()) < 1e-5
    assert layer["ffn_var"] < layer["out_var"]  # the stream has the embedding in it; the branch does not
