"""`depthlab study`: not available yet (the studies issue)."""

from depthlab.cli import not_available

register = not_available("study", "the studies issue")
