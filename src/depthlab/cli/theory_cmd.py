"""`depthlab theory`: not available yet (the theory issue)."""

from depthlab.cli import not_available

register = not_available("theory", "the theory issue")
