"""`depthlab eval`: not available yet (the evaluation issue)."""

from depthlab.cli import not_available

register = not_available("eval", "the evaluation issue")
