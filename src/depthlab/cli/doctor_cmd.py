"""`depthlab doctor`: not available yet (the theory issue)."""

from depthlab.cli import not_available

register = not_available("doctor", "the theory issue")
