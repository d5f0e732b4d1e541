"""`depthlab demo`: not available yet (the foundation issue)."""

from depthlab.cli import not_available

register = not_available("demo", "the foundation issue")
