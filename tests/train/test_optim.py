import itertools
import math

import torch

from depthlab.config import ModelConfig, OptimizerConfig, ScheduleConfig
from depthlab.model.transformer import Transformer
from depthlab.train.optim import build_optimizer, decay_groups, lr_at


def names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_decay_groups_default_matrices_only():
    m = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, seq_len=8))
    decay, no_decay = decay_groups(m, OptimizerConfig())
    d, nd = names(m, decay), names(m, no_decay)
    assert "embed.weight" in nd and "lm_head.weight" in d and "norm.weight" in nd
    assert all(m.get_parameter(n).ndim == 2 for n in d)
    assert {"blocks.0.attn.wq.weight", "blocks.1.ffn.w_down.weight"} <= d
    d2 = names(m, decay_groups(m, OptimizerConfig(decay_norms=True, decay_embeddings=True))[0])
    assert {"embed.weight", "norm.weight", "blocks.0.norm1.weight"} <= d2


def test_tied_embedding_counted_once_and_follows_embedding_rule():
    m = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, seq_len=8, tie_embeddings=True))
    decay, no_decay = decay_groups(m, OptimizerConfig())
    assert len(decay) + len(no_decay) == len(list(m.parameters()))
    assert "embed.weight" in names(m, no_decay)


def test_decoupled_weight_decay_is_lr_times_lambda():
    m = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, seq_len=8))
    opt = build_optimizer(m, OptimizerConfig(lr=0.1, weight_decay=0.5))
    w = m.blocks[0].attn.wq.weight
    before = w.detach().clone()
    emb_before = m.embed.weight.detach().clone()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.1 * 0.5))
    torch.testing.assert_close(m.embed.weight.detach(), emb_before)


def test_schedule_warmup_then_cosine_to_alpha_f():
    s = ScheduleConfig(warmup_steps=10, alpha_f=0.1)
    assert lr_at(0, 110, 1.0, s) == 0.1
    assert lr_at(9, 110, 1.0, s) == 1.0
    assert lr_at(10, 110, 1.0, s) == 1.0
    assert math.isclose(lr_at(60, 110, 1.0, s), 0.55)  # halfway: floor + (1-floor)/2
    assert math.isclose(lr_at(110, 110, 1.0, s), 0.1)
    lrs = [lr_at(i, 110, 1.0, s) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
