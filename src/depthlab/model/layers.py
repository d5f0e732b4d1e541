"""Building blocks shared by the dense and the MoE model: the SwiGLU FFN and the initialisation rule.

Initialisation (SPEC §2): every matrix and embedding normal(0, init_std), norms ones; under
``init_scheme=depth_scaled`` the output projections (attention ``wo``, every FFN/expert ``w_down``) use
``init_std/sqrt(2L)``. Each module initialises its own parameters through ``reset_parameters(std, out_std)``, and
`Transformer.reset_parameters` calls them in parameter order.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from depthlab.config import ModelConfig


def init_stds(cfg: ModelConfig) -> tuple[float, float]:
    """``(std, out_std)``: the std of every matrix and the std of the output projections."""
    out = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.init_scheme == "depth_scaled" else cfg.init_std
    return cfg.init_std, out


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def reset_parameters(self, std: float, out_std: float) -> None:
        for lin, s in ((self.w_gate, std), (self.w_up, std), (self.w_down, out_std)):
            nn.init.normal_(lin.weight, 0.0, s)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
