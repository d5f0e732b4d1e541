import math

import pytest
import torch
import torch.nn.functional as F

from depthlab.config import Config, ModelConfig, MoEConfig, validate
from depthlab.errors import CheckpointError, ConfigError
from depthlab.model.moe import MoE, batch_routing, moe_layers
from depthlab.model.params import param_counts
from depthlab.model.transformer import Transformer
from depthlab.train.stats import LayerStats, RoutingStats


def moe_cfg(d=32, n_layers=2, **moe) -> ModelConfig:
    spec = {"num_experts": 4, "top_k": 2, "expert_hidden": 16}
    spec.update(moe)
    return ModelConfig(vocab_size=61, d_model=d, n_layers=n_layers, n_heads=4, seq_len=16, moe=MoEConfig(**spec))


def moe_layer(d=32, seed=0, **moe) -> MoE:
    torch.manual_seed(seed)
    return MoE(moe_cfg(d=d, **moe))


def brute_force(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax over E, the k largest probabilities, Σ_j w_j·SwiGLU_j(x) (+ shared)."""
    ex = layer.experts
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        p = torch.softmax(x[n] @ layer.router.weight.T, -1)
        ranked = sorted(range(layer.num_experts), key=lambda e: -p[e].item())[:layer.top_k]
        w = torch.stack([p[e] for e in ranked])
        if layer.renormalize:
            w = w / w.sum()
        for wj, e in zip(w, ranked):
            h = F.silu(ex.w_gate[e] @ x[n]) * (ex.w_up[e] @ x[n])
            out[n] += wj * (ex.w_down[e] @ h)
        if layer.shared is not None:
            s = layer.shared
            out[n] += s.w_down.weight @ (F.silu(s.w_gate.weight @ x[n]) * (s.w_up.weight @ x[n]))
    return out


@pytest.mark.parametrize("d", [32, 20])  # 32: grouped_mm path; 20: per-expert loop
@pytest.mark.parametrize("spec", [{}, {"renormalize": True}, {"shared_expert_hidden": 24},
                                  {"num_experts": 8, "top_k": 3, "renormalize": True, "shared_expert_hidden": 8}])
def test_moe_matches_per_token_brute_force(d, spec):
    layer = moe_layer(d=d, **spec)
    assert layer.experts.grouped == (d % 8 == 0)
    x = torch.randn(2, 7, d)
    torch.testing.assert_close(layer(x), brute_force(layer, x.view(-1, d)).view(2, 7, d), rtol=1e-5, atol=1e-5)


def test_dropless_under_extreme_imbalance():
    """A router that sends every token to experts 0 and 1: no token loses a slot, there is no capacity limit."""
    layer = moe_layer(num_experts=8, top_k=2)
    v = F.normalize(torch.randn(32), dim=0)
    x = 0.1 * torch.randn(64, 32) + v
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0], layer.router.weight[1] = 10 * v, 9 * v
    stats = RoutingStats([layer], torch.device("cpu"))
    with stats.attached():
        y = layer(x)
    counts = stats.sums[0, :8]
    assert counts.tolist() == [64, 64, 0, 0, 0, 0, 0, 0]  # all 128 slots served by two experts
    torch.testing.assert_close(y, brute_force(layer, x), rtol=1e-5, atol=1e-5)


def test_grouped_and_loop_paths_agree_in_values_and_gradients():
    layer = moe_layer(num_experts=8, top_k=2)
    x = torch.randn(40, 32, requires_grad=True)
    grads = []
    for grouped in (True, False):
        layer.experts.grouped = grouped
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        (y * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append([y.detach(), x.grad.clone(), *[p.grad.clone() for p in layer.parameters()]])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs_forward_and_backward():
    layer = moe_layer(num_experts=4, top_k=2, shared_expert_hidden=16)
    x = torch.randn(3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    torch.testing.assert_close(y, layer(x), rtol=0.05, atol=0.02)


def test_aux_losses_against_hand_computation():
    layer = moe_layer(num_experts=4, top_k=2, lb_weight=0.01, z_weight=0.001)
    x = torch.randn(10, 32)
    layer(x)
    logits = x @ layer.router.weight.T
    p = logits.softmax(-1)
    chosen = p.topk(2, -1).indices
    f = torch.stack([(chosen == e).any(-1).float().mean() for e in range(4)])  # fraction of tokens choosing e
    lb = 4 / 2 * (f * p.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(layer.lb_loss, lb)
    torch.testing.assert_close(layer.z_loss, z)
    torch.testing.assert_close(layer.aux_loss, (0.01 * lb + 0.001 * z) / 2)  # n_layers = 2, divided once


def test_uniform_routing_gives_lb_exactly_one():
    layer = moe_layer(num_experts=8, top_k=2)
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities (and all tokens tie onto the same experts)
    layer(torch.randn(12, 32))
    assert layer.lb_loss.item() == 1.0
    # Perfectly balanced counts with arbitrary probabilities: also exactly 1 (Σ_e P_e = 1).
    layer = moe_layer(num_experts=4, top_k=2)
    layer.batch_counts = torch.tensor([3.0, 3.0, 3.0, 3.0, 6.0], dtype=torch.float64)  # 6 tokens × 2 slots
    layer(torch.randn(6, 32))
    assert abs(layer.lb_loss.item() - 1.0) < 1e-6


@pytest.mark.parametrize("n_layers", [1, 4])
def test_model_aux_loss_is_divided_by_depth_once(n_layers):
    torch.manual_seed(0)
    model = Transformer(moe_cfg(n_layers=n_layers, num_experts=8, top_k=2, lb_weight=0.01, z_weight=0.001))
    for layer in moe_layers(model):
        layer.router.weight.data.zero_()  # every layer: lb = 1, z = log(8)²
    out = model(torch.randint(0, 61, (2, 8)), torch.randint(0, 61, (2, 8)))
    expected = 0.01 * 1.0 + 0.001 * math.log(8) ** 2  # the same total at any depth
    assert abs(out.aux_loss.item() - expected) < 1e-6
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)


def _accumulated(model, x, y, n_micro, pin=True):
    model.zero_grad()
    micro = [(x[i::n_micro], y[i::n_micro]) for i in range(n_micro)]
    total = torch.zeros(())
    with batch_routing(model, [xs for xs, _ in micro]) if pin else torch.enable_grad():
        for xs, ys in micro:
            out = model(xs, ys)
            (out.loss / n_micro).backward()
            total += out.loss.detach() / n_micro
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_is_exact():
    """The same 8 sequences as 1 or 4 micro-batches: same loss, same gradients (the aux loss included)."""
    torch.manual_seed(0)
    model = Transformer(moe_cfg(num_experts=4, top_k=2, lb_weight=1.0, z_weight=0.1))
    x, y = torch.randint(0, 61, (8, 12)), torch.randint(0, 61, (8, 12))
    loss1, grads1 = _accumulated(model, x, y, 1)
    loss4, grads4 = _accumulated(model, x, y, 4)
    torch.testing.assert_close(loss4, loss1, rtol=1e-6, atol=1e-6)
    for name in grads1:
        torch.testing.assert_close(grads4[name], grads1[name], rtol=1e-5, atol=1e-7, msg=name)
    assert all(layer.batch_counts is None for layer in moe_layers(model))  # unpinned after the step
    # Without the pinned batch counts the router gradients differ: the test above is not vacuous.
    _, naive = _accumulated(model, x, y, 4, pin=False)
    router = "blocks.0.ffn.router.weight"
    assert not torch.allclose(naive[router], grads1[router], rtol=1e-5, atol=1e-7)


def test_layer_stats_report_routing_and_the_moe_branch():
    torch.manual_seed(0)
    model = Transformer(moe_cfg(n_layers=3, num_experts=4, top_k=2))
    stats = LayerStats(3, torch.device("cpu"))
    branch = {}
    hooks = [b.ffn.register_forward_hook(lambda m, i, o, k=k: branch.setdefault(k, []).append(o.detach()))
             for k, b in enumerate(model.blocks)]
    x = torch.randint(0, 61, (4, 10))
    for xs in x.split(2):  # two micro-batches accumulate into one line
        with stats.attached(model):
            model(xs)
    for h in hooks:
        h.remove()
    record = stats.finish()
    assert record["sample_tokens"] == 40 and 0 <= record["moe_diversity"] <= 1
    for i, entry in enumerate(record["layers"]):
        load = torch.tensor(entry["moe_load"])
        assert load.sum().item() == pytest.approx(1.0) and (load > 0).any()
        assert entry["moe_imbalance"] == pytest.approx(load.max().item() * 4)
        assert 0 <= entry["moe_balance"] <= 1 and 0 < entry["moe_router_entropy"] <= math.log(4) + 1e-6
        assert entry["lb_loss_weighted"] == pytest.approx(entry["lb_loss"] * 0.01 / 3)
        assert entry["z_loss_weighted"] == pytest.approx(entry["z_loss"] * 0.001 / 3)
        # ffn_var / ffn_norm are the MoE branch output, not the residual stream (SPEC §9 defect 6).
        f = torch.cat(branch[i]).reshape(-1, 32)
        assert entry["ffn_var"] == pytest.approx(f.var(-1, unbiased=False).mean().item(), rel=1e-5)
        assert entry["ffn_norm"] == pytest.approx(f.norm(dim=-1).mean().item(), rel=1e-5)
    # The logged loads are the router's actual top-k over all 40 tokens.
    layer0 = moe_layers(model)[0]
    h = model.blocks[0]
    with torch.no_grad():
        stream = model.embed(x)
        u = stream + h.attn(h.norm1(stream))
        _, _, chosen, _ = layer0.route(h.norm2(u).reshape(-1, 32))
    expected = torch.bincount(chosen.flatten(), minlength=4) / (40 * 2)
    torch.testing.assert_close(torch.tensor(record["layers"][0]["moe_load"], dtype=torch.float64), expected.double())


def test_routing_stats_that_missed_a_pass_are_refused():
    model = Transformer(moe_cfg(n_layers=2))
    stats = LayerStats(2, torch.device("cpu"))
    with stats.attached(model):
        model(torch.randint(0, 61, (1, 6)))
    stats.routing.sums[1].zero_()  # as if layer 1's router had never reported
    with pytest.raises(RuntimeError, match="missed forward passes"):
        stats.finish()


@pytest.mark.parametrize("spec", [{}, {"shared_expert_hidden": 24}, {"expert_hidden": 0, "top_k": 1}])
@pytest.mark.parametrize("tied", [False, True])
def test_param_counts_match_the_built_moe_model(spec, tied):
    cfg = moe_cfg(n_layers=3, **spec)
    cfg.tie_embeddings = tied
    model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts.experts == experts
    assert counts.active == counts.total - experts + experts * cfg.moe.top_k // cfg.moe.num_experts


@pytest.mark.parametrize("moe, match", [
    ({"num_experts": 4, "top_k": 5}, "model.moe.top_k"),
    ({"num_experts": 0, "expert_hidden": 64}, "model.moe.expert_hidden"),
    ({"num_experts": 0, "shared_expert_hidden": 64}, "model.moe.shared_expert_hidden"),
    ({"num_experts": -1}, "model.moe.num_experts"),
    ({"num_experts": 4, "expert_hidden": -8}, "model.moe.expert_hidden"),
])
def test_bad_moe_configs_name_their_keys(moe, match):
    cfg = Config()
    cfg.model.moe = MoEConfig(**moe)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


@pytest.mark.parametrize("src_moe, dst_moe, kind", [(True, False, "MoE"), (False, True, "MoE"), (True, True, "MoE")])
def test_dense_and_moe_checkpoints_do_not_cross_load(tmp_path, src_moe, dst_moe, kind):
    from depthlab.checkpoint import load_model_weights, model_state, save_checkpoint

    dense = {"num_experts": 0, "top_k": 2, "expert_hidden": 0}
    src = Transformer(moe_cfg() if src_moe else moe_cfg(**dense))
    path = save_checkpoint(tmp_path, 1, model_state(src), {"step": 1}, keep_last=1)
    # the last case: same MoE layout, different expert size
    dst = Transformer(moe_cfg(expert_hidden=24) if src_moe and dst_moe else moe_cfg() if dst_moe else
                      moe_cfg(**dense))
    with pytest.raises(CheckpointError, match=f"does not fit this {kind} config"):
        load_model_weights(path, dst)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face export / import


def _perturbed(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)  # norms away from 1, so a dropped norm weight would show
        for layer in moe_layers(model):
            layer.router.weight.normal_(0, 0.5)  # decisive routing: every expert is used
    return model.eval()


@pytest.mark.parametrize("family, spec, extra", [
    ("qwen2_moe", {}, {}),
    ("qwen2_moe", {"shared_expert_hidden": 24}, {"tie_embeddings": True}),
    ("qwen2_moe", {"shared_expert_hidden": 16, "renormalize": True}, {"n_kv_heads": 2}),
    ("mixtral", {"renormalize": True}, {"n_kv_heads": 1, "norm_affine": False}),
    ("qwen3_moe", {"top_k": 1}, {"qk_norm": True, "rope_theta": 500.0}),
    ("qwen3_moe", {"renormalize": True, "num_experts": 8, "top_k": 3}, {"qk_norm": True}),
])
def test_export_and_import_keep_logits(family, spec, extra):
    from transformers import AutoModelForCausalLM

    from depthlab.model.hf_moe import export_moe_state, import_moe

    cfg = moe_cfg(n_layers=2, **spec)
    for key, value in extra.items():
        setattr(cfg, key, value)
    model = _perturbed(cfg)
    hf_config, state = export_moe_state(model, cfg)
    assert hf_config.model_type == family
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    if cfg.tie_embeddings:
        hf.tie_weights()
    hf.eval()
    ids = torch.randint(0, 61, (2, 16))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    cfg2, state2 = import_moe(hf)
    assert cfg2.moe.shared_expert_hidden == cfg.moe.shared_expert_hidden
    assert cfg2.moe.renormalize == cfg.moe.renormalize and cfg2.qk_norm == cfg.qk_norm
    back = Transformer(cfg2)
    back.load_state_dict(state2, strict=not cfg.tie_embeddings)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, ours, rtol=0, atol=1e-4)


def test_saved_export_reloads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from depthlab.model.hf_moe import export_moe_state

    cfg = moe_cfg(shared_expert_hidden=16)
    model = _perturbed(cfg)
    hf_config, state = export_moe_state(model, cfg)
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    hf.load_state_dict(state)
    hf.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


def test_unmappable_moe_configs_and_models_are_refused():
    from transformers import AutoModelForCausalLM, OlmoeConfig, Qwen2MoeConfig

    from depthlab.errors import ModelLoadError
    from depthlab.model.hf_moe import export_moe_state, import_moe

    cfg = moe_cfg(shared_expert_hidden=16)
    cfg.qk_norm = True
    with pytest.raises(ModelLoadError, match=r"model.qk_norm.*model.moe.shared_expert_hidden"):
        export_moe_state(Transformer(cfg), cfg)
    small = {"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}
    olmoe = AutoModelForCausalLM.from_config(OlmoeConfig(**small, num_experts=4, num_experts_per_tok=2))
    with pytest.raises(ModelLoadError, match="OLMoE"):
        import_moe(olmoe)
    gated = AutoModelForCausalLM.from_config(Qwen2MoeConfig(**small, moe_intermediate_size=8, num_experts=4,
                                                            num_experts_per_tok=2, qkv_bias=False,
                                                            shared_expert_intermediate_size=8))
    with torch.no_grad():
        gated.model.layers[0].mlp.shared_expert_gate.weight.fill_(0.1)
    with pytest.raises(ModelLoadError, match="nonzero gate"):
        import_moe(gated)
    biased = AutoModelForCausalLM.from_config(Qwen2MoeConfig(**small, moe_intermediate_size=8, num_experts=4,
                                                             num_experts_per_tok=2, qkv_bias=True))
    with pytest.raises(ModelLoadError, match="biased attention"):
        import_moe(biased)
