"""MoE training: a short run through depthlab.train, exact accumulation and data parallelism, and the implicit-sparsity
statistics (weight and attention sparsity) against brute-force references."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.multiprocessing as mp

from depthlab import measures
from depthlab.config import Config, ModelConfig, MoEConfig
from depthlab.data import prepare_data
from depthlab.model.moe import batch_routing
from depthlab.model.transformer import Transformer
from depthlab.train import sparsity
from depthlab.train.trainer import train

WORDS = ["thou", "art", "the", "king", "of", "all", "land", "and", "yet", "night", "is", "long", "my", "lord"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_data")
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(16):
        lines = (" ".join(rng.choices(WORDS, k=6)) for _ in range(40))
        (corpus / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return prepare_data(corpus, root / "prepared", "bpe", vocab_size=300, val_fraction=0.25)


def moe_config(dataset, **trainer) -> Config:
    cfg = Config()
    cfg.data.path = str(dataset)
    cfg.model = ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=32,
                            moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, shared_expert_hidden=16))
    cfg.optimizer.lr = 1e-2
    cfg.schedule.warmup_steps = 5
    settings = {"max_steps": 30, "batch_size": 8, "micro_batch_size": 4, "eval_interval": 0, "save_interval": 0,
                "stats_interval": 10, "log_interval": 1, "dtype": "fp32", "device": "cpu",
                "stats_weight_sparsity": True, "stats_attention": True}
    settings.update(trainer)
    for key, value in settings.items():
        setattr(cfg.trainer, key, value)
    cfg.logging.progress = cfg.logging.tensorboard = False
    return cfg


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_short_moe_training_run_learns_and_logs_moe_and_sparsity_stats(dataset, tmp_path):
    result = train(moe_config(dataset), tmp_path / "run")
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert all(r["aux_loss"] > 0 for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r)
    assert result.step == 30
    lines = read_jsonl(tmp_path / "run" / "layer_stats.jsonl")
    assert [r["step"] for r in lines] == [1, 10, 20, 30]
    for record in lines:
        assert record["tokens"] == record["step"] * 8 * 32 and record["sample_tokens"] == 8 * 32
        assert "moe_diversity" in record
        for layer in record["layers"]:
            assert sum(layer["moe_load"]) == pytest.approx(1.0) and max(layer["moe_load"]) > 0
            assert layer["lb_loss_weighted"] == pytest.approx(layer["lb_loss"] * 0.01 / 2)
            ws = layer["weight_sparsity"]
            assert set(ws) == {"attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.router", "ffn.experts.w_gate",
                               "ffn.experts.w_up", "ffn.experts.w_down", "ffn.shared.w_gate", "ffn.shared.w_up",
                               "ffn.shared.w_down"}
            assert all(0 <= v <= 1 for stats in ws.values() for v in stats.values())
            assert 0 < layer["attn_entropy"] <= math.log(32) and 0 < layer["attn_normalized_entropy"] <= 1
            assert 1 <= layer["attn_effective_support"] <= 32
            assert 0 < layer["attn_top1_mass"] <= layer["attn_top8_mass"] <= 1
            assert len(layer["attn_entropy_heads"]) == 4


def test_trainer_accumulation_matches_the_full_batch(dataset, tmp_path):
    """Micro-batches of 2 vs the whole batch at once: same logged losses (the aux loss included) and weights."""
    runs = {}
    for micro in (8, 2):
        cfg = moe_config(dataset, max_steps=3, micro_batch_size=micro, stats_interval=0,
                         stats_weight_sparsity=False, stats_attention=False)
        cfg.model.moe.lb_weight = 1.0
        train(cfg, tmp_path / f"m{micro}")
        from depthlab.model.io import load_depthlab

        model, _ = load_depthlab(tmp_path / f"m{micro}")
        metrics = [r for r in read_jsonl(tmp_path / f"m{micro}" / "metrics.jsonl") if "loss" in r]
        runs[micro] = ([r["loss"] for r in metrics], [r["aux_loss"] for r in metrics], model.state_dict())
    (loss8, aux8, state8), (loss2, aux2, state2) = runs[8], runs[2]
    assert loss2 == pytest.approx(loss8, rel=1e-6) and aux2 == pytest.approx(aux8, rel=1e-6)
    for name in state8:
        torch.testing.assert_close(state2[name], state8[name], rtol=1e-4, atol=1e-6, msg=name)


def _ddp_worker(rank: int, world: int, init_file: str, x: torch.Tensor, y: torch.Tensor, out: dict) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Transformer(_ddp_model_cfg())
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        for n_micro in (1, 2):  # in-forward all-reduce, then the routing pre-pass
            model.zero_grad()
            with batch_routing(model, xs.chunk(n_micro)):
                for xm, ym in zip(xs.chunk(n_micro), ys.chunk(n_micro)):
                    (model(xm, ym).loss / n_micro).backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            tdist.all_reduce(grads)
            out[(rank, n_micro)] = grads / world  # what DDP's gradient averaging gives
    finally:
        tdist.destroy_process_group()


def _ddp_model_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, seq_len=8,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, lb_weight=1.0))


def test_data_parallel_ranks_reproduce_the_single_process_gradient(tmp_path):
    torch.manual_seed(1)
    x, y = torch.randint(0, 50, (8, 8)), torch.randint(0, 50, (8, 8))
    torch.manual_seed(0)
    model = Transformer(_ddp_model_cfg())
    model(x, y).loss.backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), x, y, out), nprocs=2)
        results = dict(out)
    for key, grads in results.items():
        torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-7, msg=str(key))
    # A rank-local f would change the router gradient: the comparison above is sensitive to it.
    local = Transformer(_ddp_model_cfg())
    local.load_state_dict(model.state_dict())
    local.zero_grad()
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        (local(xs, ys).loss / 2).backward()
    router = [n for n, _ in model.named_parameters()].index("blocks.0.ffn.router.weight")
    naive = torch.cat([p.grad.flatten() for p in local.parameters()])
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[:router])
    assert not torch.allclose(naive[start:start + sizes[router]], expected[start:start + sizes[router]],
                              rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Implicit-sparsity statistics (SPEC §5.6, §5.7); the formulas themselves are tested in tests/test_measures.py


def test_attention_sparsity_by_layer_uses_each_blocks_attention_input():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, seq_len=10, norm="mix",
                                    mix_fraction=0.34, lns=True))
    probe = torch.randint(0, 40, (2, 10))
    got = sparsity.attention_sparsity_by_layer(model, probe)
    expected = [dict.fromkeys(("entropy", "effective_support"), 0.0) for _ in range(3)]
    with torch.no_grad():
        for seq in probe:
            h = model.embed(seq[None])
            for i, block in enumerate(model.blocks):
                # block 0 is post-LN (attention sees x·s), blocks 1-2 pre-LN (attention sees N1(x)·s)
                a_in = h * block.scale if block.placement == "post" else block.norm1(h) * block.scale
                stats = measures.attention_means(measures.attention_sums(block.attn.probabilities(a_in)))
                for key in expected[i]:
                    expected[i][key] += stats[key].mean().item() / len(probe)
                h = block(h)
    for entry, ref in zip(got, expected):
        assert entry["attn_entropy"] == pytest.approx(ref["entropy"], rel=1e-6)
        assert entry["attn_effective_support"] == pytest.approx(ref["effective_support"], rel=1e-6)
        assert entry["attn_entropy"] == pytest.approx(sum(entry["attn_entropy_heads"]) / 2, rel=1e-9)
    assert model.training  # restored


def test_weight_sparsity_by_block_covers_every_matrix_once():
    model = Transformer(ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, seq_len=8,
                                    moe=MoEConfig(num_experts=4, top_k=1, expert_hidden=8)))
    with torch.no_grad():
        model.blocks[1].ffn.experts.w_up[:, :4].zero_()  # half of every expert's up-projection rows
    entries = sparsity.weight_sparsity_by_block(model)
    assert entries[0]["weight_sparsity"].keys() == {"attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.router",
                                                    "ffn.experts.w_gate", "ffn.experts.w_up", "ffn.experts.w_down"}
    assert entries[1]["weight_sparsity"]["ffn.experts.w_up"]["frac_below_rel_0.001"] >= 0.5
    assert entries[0]["weight_sparsity"]["ffn.experts.w_up"]["frac_below_rel_0.001"] < 0.1
