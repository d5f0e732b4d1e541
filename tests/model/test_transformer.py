import math

import pytest
import torch
import torch.nn.functional as F

from depthlab.config import ModelConfig, MoEConfig
from depthlab.model.params import param_counts
from depthlab.model.transformer import Block, Rotary, Transformer


def tiny(**kw) -> ModelConfig:
    base = {"vocab_size": 97, "d_model": 32, "n_layers": 4, "n_heads": 4, "seq_len": 16}
    base.update(kw)
    return ModelConfig(**base)


def model_for(**kw) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(tiny(**kw))
    # Perturb norm weights so the tests see them (they start at exactly 1).
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return m.eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1}, {"norm": "post"}, {"norm": "peri", "qk_norm": True}])
def test_causal_future_tokens_never_change_past_logits(kw):
    m = model_for(**kw)
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, 97, (2, 5))
    a, b = m(ids).logits, m(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = model_for(n_kv_heads=2)
    mha = Transformer(tiny()).eval()
    state = gqa.state_dict()
    hd, group = 8, 2
    for key in list(state):
        if key.endswith(("attn.wk.weight", "attn.wv.weight")):
            w = state[key].view(2, hd, 32)  # [kv_heads, hd, d]
            state[key] = w.repeat_interleave(group, dim=0).reshape(4 * hd, 32)
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, rtol=1e-5, atol=1e-5)


def ref_rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_attention(x, attn, n_heads, n_kv):
    """Hand-written causal attention with explicit RoPE (complex-number form) and explicit masking."""
    B, T, d = x.shape
    hd = d // n_heads
    q = (x @ attn.wq.weight.T).view(B, T, n_heads, hd)
    k = (x @ attn.wk.weight.T).view(B, T, n_kv, hd)
    v = (x @ attn.wv.weight.T).view(B, T, n_kv, hd)
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(T).float(), inv)  # [T, hd/2]

    def rope(t):  # rotate pairs (i, i + hd/2), the rotate-half convention
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    q, k = rope(q), rope(k)
    k = k.repeat_interleave(n_heads // n_kv, 2)
    v = v.repeat_interleave(n_heads // n_kv, 2)
    out = torch.zeros(B, T, n_heads, hd)
    for t in range(T):
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, : t + 1]) / math.sqrt(hd)
        out[:, t] = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v[:, : t + 1])
    return out.reshape(B, T, d) @ attn.wo.weight.T


def ref_ffn(x, ffn):
    return (F.silu(x @ ffn.w_gate.weight.T) * (x @ ffn.w_up.weight.T)) @ ffn.w_down.weight.T


def ref_block(b: Block, x, n_heads, n_kv, placement, s):
    attn = lambda h: ref_attention(h, b.attn, n_heads, n_kv)
    if placement == "post":
        u = ref_rms(x + attn(x * s), b.norm1.weight)
        return ref_rms(u + ref_ffn(u * s, b.ffn), b.norm2.weight)
    a = attn(ref_rms(x, b.norm1.weight) * s)
    if placement == "peri":
        a = ref_rms(a, b.attn_out_norm.weight)
    u = x + a
    f = ref_ffn(ref_rms(u, b.norm2.weight) * s, b.ffn)
    if placement == "peri":
        f = ref_rms(f, b.ffn_out_norm.weight)
    return u + f


@pytest.mark.parametrize("norm", ["pre", "post", "peri", "mix"])
@pytest.mark.parametrize("lns", [False, True])
def test_block_matches_hand_written_reference(norm, lns):
    m = model_for(norm=norm, lns=lns, n_kv_heads=2)
    x = torch.randn(2, 9, 32)
    for i, b in enumerate(m.blocks):
        expected_placement = ("post" if i < 1 else "pre") if norm == "mix" else norm  # floor(4·0.25) = 1
        assert b.placement == expected_placement
        s = 1 / math.sqrt(i + 1) if lns else 1.0
        ref = ref_block(b, x, 4, 2, expected_placement, s)
        torch.testing.assert_close(b(x), ref, rtol=1e-4, atol=1e-5)


def test_lns_scale_survives_meta_init_and_reload(tmp_path):
    from safetensors.torch import load_file, save_file

    from depthlab.checkpoint import model_state

    src = model_for(lns=True)
    save_file(model_state(src), tmp_path / "m.safetensors")
    with torch.device("meta"):
        m = Transformer(tiny(lns=True))
    m.to_empty(device="cpu")
    m.load_state_dict(load_file(tmp_path / "m.safetensors"))
    assert [b.scale for b in m.blocks] == [1 / math.sqrt(i + 1) for i in range(4)]
    ids = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(m.eval()(ids).logits, src(ids).logits)


def test_tied_embeddings_share_storage_and_rope_tables_are_not_state():
    m = Transformer(tiny(tie_embeddings=True))
    assert m.lm_head.weight is m.embed.weight
    assert not any("rotary" in k or "cos" in k for k in m.state_dict())


def test_init_statistics_and_depth_scaled_outputs():
    torch.manual_seed(0)
    m = Transformer(tiny(d_model=256, n_heads=4, n_layers=8, init_scheme="depth_scaled"))
    assert abs(m.blocks[0].attn.wq.weight.std().item() - 0.02) < 1e-3
    assert abs(m.blocks[0].attn.wo.weight.std().item() - 0.02 / 4) < 5e-4  # 1/sqrt(2·8) = 1/4
    assert abs(m.blocks[0].ffn.w_down.weight.std().item() - 0.02 / 4) < 5e-4
    assert torch.all(m.norm.weight == 1)


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True, "qk_norm": True, "n_kv_heads": 2},
                                {"norm": "peri", "norm_affine": False}])
def test_param_counts_match_the_built_model(kw):
    cfg = tiny(**kw)
    m = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts.total == sum(p.numel() for p in m.parameters())
    assert counts.active == counts.total and counts.experts == 0
    assert counts.embedding == 97 * 32 * (1 if cfg.tie_embeddings else 2)


def test_param_counts_moe_active_fraction():
    cfg = tiny(moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=64))
    counts = param_counts(cfg)
    per_layer_experts = 8 * 3 * 32 * 64
    assert counts.experts == 4 * per_layer_experts
    assert counts.total - counts.active == 4 * per_layer_experts * 6 // 8


def test_sequence_longer_than_context_is_refused():
    m = Transformer(tiny())
    with pytest.raises(ValueError, match="exceeds the model's context"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_rotary_matches_complex_rotation():
    rot = Rotary(8, 16, 10000.0)
    cos, sin = rot.tables(5, torch.device("cpu"))
    x = torch.randn(5, 8)
    got = Rotary.apply(x, cos, sin)
    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    z = torch.complex(x[:, :4], x[:, 4:]) * torch.polar(torch.ones(5, 4), torch.outer(torch.arange(5.0), inv))
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1), rtol=1e-5, atol=1e-6)
