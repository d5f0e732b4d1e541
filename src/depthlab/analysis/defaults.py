"""Defaults of the `depthlab analyze` command line: plain constants, importable without torch."""

CLI_METRICS = ("variance", "angular", "usefulness", "causal", "permutation", "weight_sparsity",
               "attention_sparsity", "moe")
"""The CLI's default set (fits a few minutes on 2 CPU cores for SmolLM2); `all` adds the Jacobian estimate."""
CLI_OPTIONS = {"permutation": {"pairs": "adjacent"}, "jacobian": {"mode": "estimate", "probes": 16, "power_iters": 4}}
NEAR_IDENTITY_ANGLE = 0.05
"""A block is reported near-identity when its mean angular distance arccos(cos)/π is below this (cos > 0.988)."""
