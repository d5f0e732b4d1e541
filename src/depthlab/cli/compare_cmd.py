"""`depthlab compare`: not available yet (the studies issue)."""

from depthlab.cli import not_available

register = not_available("compare", "the studies issue")
