"""Tiny random causal LMs of several families, and brute-force helpers that edit the block list directly."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from torch import nn

from depthlab.model.view import ModelView

V = 64


def hf_config(family: str):
    common = {"vocab_size": V, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
              "num_attention_heads": 4, "initializer_range": 0.25, "max_position_embeddings": 32}
    return {
        "llama": lambda: T.LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, **common),
        "olmo2": lambda: T.Olmo2Config(**common),
        "neox": lambda: T.GPTNeoXConfig(**common),
        "mixtral": lambda: T.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common),
        "gpt2": lambda: T.GPT2Config(vocab_size=V, n_embd=16, n_layer=3, n_head=4, n_positions=32,
                                     initializer_range=0.25),
    }[family]()


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family == "depthlab":
        from depthlab.config import ModelConfig
        from depthlab.model.transformer import Transformer

        model = Transformer(ModelConfig(vocab_size=V, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, seq_len=32,
                                        init_std=0.25))
    else:
        model = T.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="sdpa")
    return model.eval()


FAMILIES = ["llama", "gpt2", "neox", "qwen2", "olmo2", "mixtral", "depthlab"]


@pytest.fixture
def ids():
    return torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(1))


class Replace(nn.Module):
    """Stands in a block list for a block: applies fn to the stream (the brute-force intervention)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h, *args, **kwargs):
        return self.fn(h)


def full_loss(model, ids) -> float:
    """Mean next-token NLL from the model's own full forward pass (fp64 reduction)."""
    with torch.no_grad():
        logits = model(ids).logits.double()
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def with_blocks(model, blocks: list, fn):
    """Run fn() with the model's block list temporarily replaced by `blocks`."""
    stack = ModelView(model)
    original = list(stack.blocks)
    for i, b in enumerate(blocks):
        stack.blocks[i] = b
    try:
        return fn()
    finally:
        for i, b in enumerate(original):
            stack.blocks[i] = b


def hidden_states(model, ids) -> list[torch.Tensor]:
    """h_0..h_L from hooks on a full forward (inputs of each block plus the last output)."""
    stack = ModelView(model)
    hs = []
    handles = [b.register_forward_pre_hook(lambda m, a, kw: hs.append((a[0] if a else kw["hidden_states"]).clone()),
                                           with_kwargs=True) for b in stack.blocks]
    handles.append(stack.blocks[-1].register_forward_hook(
        lambda m, a, out: hs.append((out[0] if isinstance(out, tuple) else out).clone())))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return hs


def with_weights_swapped(model, a: int, b: int):
    """A copy of `model` whose blocks a and b exchanged weights; each module keeps what belongs to its position
    (LNS factor, norm placement, layer index, attention type): the brute-force swap of SPEC §1."""
    twin = copy.deepcopy(model)
    blocks = ModelView(twin).blocks
    sa, sb = ({k: v.clone() for k, v in blocks[i].state_dict().items()} for i in (a, b))
    blocks[a].load_state_dict(sb)
    blocks[b].load_state_dict(sa)
    return twin
