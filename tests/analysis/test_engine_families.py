"""The ModelView on every decoder family transformers ships (tiny random configs), against brute force.

For each family the brute-force references use only the family's own attribute names (listed in the table, not
taken from the view): the branch added to the stream is (block output with the FFN sub-layer zeroed) − (block input)
for attention, and (block output) − (that) for the FFN — the decomposition of y − x that the view must reproduce
whatever norms (Gemma-2/3, OLMo-2, GLM-4) or residual multipliers (Granite) sit between sub-layer and stream.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from depthlab.analysis import permutation_scores, variance_profile
from depthlab.analysis.engine import Drop, Engine
from depthlab.config import ModelConfig
from depthlab.model.transformer import Transformer
from depthlab.model.view import ModelView

from .conftest import V, full_loss, hidden_states, with_weights_swapped

COMMON = {"vocab_size": V, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 32, "initializer_range": 0.25}
GQA = {**COMMON, "num_key_value_heads": 2}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 8}

# family: (config factory, attention attribute, FFN attribute, attn implementation)
FAMILIES = {
    "llama": (lambda: T.LlamaConfig(**GQA), "self_attn", "mlp", "sdpa"),
    "mistral": (lambda: T.MistralConfig(**GQA), "self_attn", "mlp", "sdpa"),
    "qwen2": (lambda: T.Qwen2Config(**GQA), "self_attn", "mlp", "sdpa"),
    "qwen3": (lambda: T.Qwen3Config(head_dim=4, **GQA), "self_attn", "mlp", "sdpa"),
    "gemma": (lambda: T.GemmaConfig(head_dim=4, **GQA), "self_attn", "mlp", "sdpa"),
    "gemma2": (lambda: T.Gemma2Config(head_dim=4, **GQA), "self_attn", "mlp", "eager"),
    "gemma3_text": (lambda: T.Gemma3TextConfig(head_dim=4, sliding_window=4, **GQA), "self_attn", "mlp", "sdpa"),
    "olmo": (lambda: T.OlmoConfig(pad_token_id=0, bos_token_id=0, eos_token_id=0, **COMMON), "self_attn", "mlp",
             "sdpa"),
    "olmo2": (lambda: T.Olmo2Config(pad_token_id=0, bos_token_id=0, eos_token_id=0, **COMMON), "self_attn", "mlp",
              "sdpa"),
    "glm4": (lambda: T.Glm4Config(pad_token_id=0, **GQA), "self_attn", "mlp", "sdpa"),
    "granite": (lambda: T.GraniteConfig(residual_multiplier=0.3, **GQA), "self_attn", "mlp", "sdpa"),
    "gpt2": (lambda: T.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, initializer_range=0.25), "attn", "mlp", "sdpa"),
    "gpt_neox": (lambda: T.GPTNeoXConfig(**COMMON), "attention", "mlp", "sdpa"),
    "gptj": (lambda: T.GPTJConfig(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=32, rotary_dim=4,
                                  bos_token_id=0, eos_token_id=0, initializer_range=0.25), "attn", "mlp", "eager"),
    "opt": (lambda: T.OPTConfig(vocab_size=V, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=32, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=0,
                                eos_token_id=0, init_std=0.25), "self_attn", "fc2", "sdpa"),
    "falcon": (lambda: T.FalconConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                      bos_token_id=0, eos_token_id=0, initializer_range=0.25),
               "self_attention", "mlp", "sdpa"),
    "phi": (lambda: T.PhiConfig(bos_token_id=0, eos_token_id=0, **COMMON), "self_attn", "mlp", "sdpa"),
    "phi3": (lambda: T.Phi3Config(pad_token_id=0, bos_token_id=0, eos_token_id=0, **GQA), "self_attn", "mlp",
             "sdpa"),
    "stablelm": (lambda: T.StableLmConfig(**GQA), "self_attn", "mlp", "sdpa"),
    "starcoder2": (lambda: T.Starcoder2Config(bos_token_id=0, eos_token_id=0, **GQA), "self_attn", "mlp", "sdpa"),
    "cohere": (lambda: T.CohereConfig(pad_token_id=0, bos_token_id=0, eos_token_id=0, **GQA), "self_attn", "mlp",
               "sdpa"),
    "gpt_bigcode": (lambda: T.GPTBigCodeConfig(vocab_size=V, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                                               bos_token_id=0, eos_token_id=0, initializer_range=0.25),
                    "attn", "mlp", "sdpa"),
    "mixtral": (lambda: T.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **GQA), "self_attn", "mlp",
                "sdpa"),
    "qwen2_moe": (lambda: T.Qwen2MoeConfig(num_experts=4, shared_expert_intermediate_size=8, **MOE, **GQA),
                  "self_attn", "mlp", "sdpa"),
    "olmoe": (lambda: T.OlmoeConfig(num_experts=4, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                    num_experts_per_tok=2, **GQA), "self_attn", "mlp", "sdpa"),
}


def build(family: str):
    make, _, _, attn = FAMILIES[family]
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(make(), attn_implementation=attn).eval()


def zeroed(module):
    """A forward hook making `module` output zeros (its first output, for tuple-returning attention)."""
    def hook(m, args, out):
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)
    return module.register_forward_hook(hook)


def block_output_with(model, layer: int, module, ids) -> torch.Tensor:
    """h_{layer+1} from a full forward with `module` (a sub-layer of block `layer`) zeroed."""
    handle = zeroed(module)
    try:
        return hidden_states(model, ids)[layer + 1].double()
    finally:
        handle.remove()


def test_table_covers_at_least_twelve_families():
    assert len(FAMILIES) >= 12


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_branch_statistics_match_the_brute_force_decomposition(family):
    model = build(family)
    ffn_name = FAMILIES[family][2]
    ids = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(1))
    view = ModelView(model)
    assert [view.branch_unavailable(l) for l in range(view.n_layers)] == [None, None]
    got = variance_profile(model, ids, micro_batch_size=2)
    hs = [h.double() for h in hidden_states(model, ids)]
    for l in range(2):
        block = view.blocks[l]
        u = block_output_with(model, l, getattr(block, ffn_name), ids)  # x + (attention branch as added)
        a, f = u - hs[l], hs[l + 1] - u
        assert got.attn_var[l] == pytest.approx(a.var(-1, unbiased=False).mean().item(), rel=1e-4), (family, l)
        assert got.ffn_var[l] == pytest.approx(f.var(-1, unbiased=False).mean().item(), rel=1e-4), (family, l)
        assert got.attn_norm[l] == pytest.approx(a.norm(dim=-1).mean().item(), rel=1e-4), (family, l)
        assert got.ffn_norm[l] == pytest.approx(f.norm(dim=-1).mean().item(), rel=1e-4), (family, l)
    assert got.branches_unavailable is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dropping_a_branch_and_swapping_blocks_match_brute_force(family):
    model = build(family)
    attn_name = FAMILIES[family][1]
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    engine = Engine(model, ids)
    base = next(engine.baselines())
    dropped = engine.resume(base, 0, base.hs[0], plan={0: Drop("attn")}).double()
    handle = zeroed(getattr(engine.stack.blocks[0], attn_name))
    try:
        full = hidden_states(model, ids)[-1].double()
    finally:
        handle.remove()
    assert not torch.allclose(full, base.hs[-1].double(), atol=1e-4)  # the branch matters: the check can fail
    assert torch.allclose(dropped, full, rtol=1e-4, atol=1e-5), family
    # a swap moves only the weights: the brute force exchanges the two blocks' state dicts
    score = permutation_scores(model, ids, pairs=[(0, 1)], engine=engine).scores[0]
    swapped = with_weights_swapped(model, 0, 1)
    base_loss = full_loss(model, ids)
    assert score == pytest.approx(abs(full_loss(swapped, ids) - base_loss) / base_loss, rel=1e-4, abs=1e-7)


def test_bloom_branches_are_unavailable_but_stream_metrics_run():
    """Bloom's attention and MLP add the residual themselves: no sub-module outputs the branch alone."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(
        T.BloomConfig(vocab_size=V, hidden_size=16, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
        attn_implementation="eager").eval()
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(1))
    got = variance_profile(model, ids)
    hs = [h.double() for h in hidden_states(model, ids)]
    assert got.out_var == pytest.approx([h.var(-1, unbiased=False).mean().item() for h in hs[1:]], rel=1e-6)
    assert "not a fixed combination" in got.branches_unavailable
    row = got.to_dict()
    assert row["attn_var"] == [None, None] and row["ffn_norm"] == [None, None]


@pytest.mark.parametrize("kw", [{"norm": "peri"}, {"norm": "peri", "lns": True, "qk_norm": True}, {"lns": True}])
def test_depthlab_branches_are_taken_after_the_peri_output_norm(kw):
    """Peri-LN normalises each branch output before the residual add: that normalised branch is what is measured."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, d_model=16, n_layers=2, n_heads=4, seq_len=32, init_std=0.25,
                                    **kw)).eval()
    ids = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(1))
    got = variance_profile(model, ids)
    hs = [h.double() for h in hidden_states(model, ids)]
    for l in range(2):
        u = block_output_with(model, l, model.blocks[l].ffn, ids)
        a, f = u - hs[l], hs[l + 1] - u
        assert got.attn_var[l] == pytest.approx(a.var(-1, unbiased=False).mean().item(), rel=1e-4)
        assert got.ffn_norm[l] == pytest.approx(f.norm(dim=-1).mean().item(), rel=1e-4)
