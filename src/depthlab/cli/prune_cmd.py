"""`depthlab prune`: not available yet (the theory issue)."""

from depthlab.cli import not_available

register = not_available("prune", "the theory issue")
