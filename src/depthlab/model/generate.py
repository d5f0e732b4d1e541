"""Text generation for any model `depthlab.load_model` returns."""

from __future__ import annotations

import torch

from depthlab.model.transformer import Transformer


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0) -> str:
    """Sample a continuation of `prompt` (greedy when temperature is 0); returns prompt + continuation."""
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=next(model.parameters()).device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id or 0]], device=ids.device)
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    if isinstance(model, Transformer):
        out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    else:
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_k=top_k,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)
