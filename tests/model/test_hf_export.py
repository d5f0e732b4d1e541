import pytest
import torch

from depthlab.config import ModelConfig
from depthlab.errors import ModelLoadError
from depthlab.model.hf import export_hf, from_hf, to_hf
from depthlab.model.transformer import Transformer


def build(**kw):
    torch.manual_seed(0)
    cfg = {"vocab_size": 101, "d_model": 32, "n_layers": 3, "n_heads": 4, "seq_len": 32}
    cfg.update(kw)
    m = Transformer(ModelConfig(**cfg))
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return m.eval()


@pytest.mark.parametrize("kw, arch", [({}, "LlamaForCausalLM"), ({"n_kv_heads": 2, "tie_embeddings": True},
                                       "LlamaForCausalLM"), ({"qk_norm": True, "n_kv_heads": 1}, "Qwen3ForCausalLM"),
                                      ({"norm_affine": False, "rope_theta": 500.0}, "LlamaForCausalLM")])
def test_export_then_load_with_auto_class_matches_logits(tmp_path, kw, arch):
    from transformers import AutoModelForCausalLM

    m = build(**kw)
    export_hf(m, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits, m(ids).logits, rtol=1e-4, atol=1e-4)
        back = from_hf(hf)
        torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw, message", [({"lns": True}, "LayerNorm Scaling"), ({"norm": "peri"}, "'peri'"),
                                         ({"norm": "mix"}, "'mix'")])
def test_non_standard_architectures_are_refused(kw, message):
    with pytest.raises(ModelLoadError, match=message):
        to_hf(build(**kw))
