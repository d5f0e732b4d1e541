"""Logit and tuned lens against dense references built from a full forward pass (hidden states reconstructed)."""

from __future__ import annotations

import pytest
import torch

from depthlab.analysis.lens import logit_lens, tuned_lens
from depthlab.errors import AnalysisError
from depthlab.model.view import ModelView
from tests.conftest import tiny_config

from .conftest import build


def reference_lens(model, ids) -> dict[str, list[float]]:
    """Dense fp64 lens statistics from ``output_hidden_states``, with its last entry handled correctly.

    HF returns (h_0, ..., h_{L-1}, final_norm(h_L)): entries 1..L-1 are raw block outputs, but the last one is already
    normalised (SPEC §9.2), so block L-1 is decoded from the model's own logits, not by normalising it again.
    """
    stack = ModelView(model)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        L = stack.n_layers
        logits = [stack.head(stack.final_norm(out.hidden_states[l + 1])) for l in range(L - 1)] + [out.logits]
    logp = torch.log_softmax(out.logits[:, :-1].double(), -1)
    target = ids[:, 1:]
    rows = {k: [] for k in ("kl", "top1_agreement", "target_logprob", "target_rank", "entropy")}
    for z in logits:
        logq = torch.log_softmax(z[:, :-1].double(), -1)
        t = logq.gather(-1, target[..., None])[..., 0]
        rows["kl"].append((logp.exp() * (logp - logq)).sum(-1).mean().item())
        rows["top1_agreement"].append((logq.argmax(-1) == logp.argmax(-1)).double().mean().item())
        rows["target_logprob"].append(t.mean().item())
        rows["target_rank"].append((logq > t[..., None]).sum(-1).double().mean().item())
        rows["entropy"].append(-(logq.exp() * logq).sum(-1).mean().item())
    return rows


def _scaled_norm(model):
    """Non-unit final-norm gains, so normalising twice (the defect) is not silently idempotent."""
    with torch.no_grad():
        ModelView(model).final_norm.weight.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox", "olmo2"])
def test_logit_lens_matches_full_forward(family, ids):
    model = _scaled_norm(build(family))
    got = logit_lens(model, ids, micro_batch_size=3)
    ref = reference_lens(model, ids)
    for key, values in ref.items():
        assert getattr(got, key) == pytest.approx(values, rel=1e-4, abs=1e-5), (family, key)
    assert got.kl[-1] == 0 and got.top1_agreement[-1] == 1
    assert max(got.kl[:-1]) > 1e-3  # random blocks change the prediction: the check is not vacuous
    assert got.tokens == ids[:, 1:].numel()
    assert got.final_entropy == pytest.approx(ref["entropy"][-1], rel=1e-5)


def test_hidden_states_last_entry_is_post_norm(ids):
    """The defect the reference avoids: decoding HF's last hidden state through the final norm again is wrong."""
    model = _scaled_norm(build("llama"))
    stack = ModelView(model)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        twice = stack.head(stack.final_norm(out.hidden_states[-1]))
    assert torch.allclose(stack.head(out.hidden_states[-1]), out.logits, atol=1e-5)
    assert not torch.allclose(twice, out.logits, atol=1e-3)


def test_lens_without_final_norm_is_a_one_line_error(ids):
    model = build("llama")
    del model.model.norm
    with pytest.raises(AnalysisError, match="cannot locate the final norm") as e:
        logit_lens(model, ids)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dataset):
    """A 4-block depthlab model trained for 60 steps, and held-out windows of its validation text."""
    from depthlab.data import calibration_sample
    from depthlab.loading import load_model
    from depthlab.train.trainer import train

    out = tmp_path_factory.mktemp("lens") / "run"
    train(tiny_config(tiny_dataset, "--model.n_layers=4", "--trainer.max_steps=60", "--trainer.save_interval=60"),
          out)
    model, tok = load_model(out)
    ids, _ = calibration_sample(tok, text=tiny_dataset, num_samples=8, seq_len=32, seed=0)
    return model, ids


def test_tuned_lens_beats_logit_lens_and_is_reused(trained, tmp_path):
    model, ids = trained
    path = tmp_path / "tuned_lens.safetensors"
    got = tuned_lens(model, ids, steps=60, batch_tokens=64, lr=3e-3, translators=str(path))
    held = logit_lens(model, ids[4:])
    assert got.logit_kl == pytest.approx(held.kl, rel=1e-5)  # same held-out positions as a plain logit lens
    assert got.tokens == held.tokens and got.fit_tokens == ids[:4, 1:].numel()
    assert sum(got.kl[:-1]) < 0.8 * sum(got.logit_kl[:-1]), (got.kl, got.logit_kl)
    assert got.kl[-1] == 0 and path.exists() and not got.reused
    again = tuned_lens(model, ids, steps=60, batch_tokens=64, lr=3e-3, translators=str(path))
    assert again.reused and again.kl == pytest.approx(got.kl)
    other = tuned_lens(model, ids, steps=5, batch_tokens=64, lr=3e-3, translators=str(path))
    assert not other.reused  # other settings: retrained, not trusted
    path.write_bytes(b"not a safetensors file")
    assert not tuned_lens(model, ids, steps=5, batch_tokens=64, lr=3e-3, translators=str(path)).reused


def test_tuned_lens_bad_options(trained):
    model, ids = trained
    with pytest.raises(AnalysisError, match="at least 2 sequences"):
        tuned_lens(model, ids[:1])
    with pytest.raises(AnalysisError, match="steps >= 1"):
        tuned_lens(model, ids, steps=0)
