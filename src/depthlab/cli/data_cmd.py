"""`depthlab data`: not available yet (the foundation issue)."""

from depthlab.cli import not_available

register = not_available("data", "the foundation issue")
