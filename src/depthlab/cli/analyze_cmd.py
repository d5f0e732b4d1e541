"""`depthlab analyze`: not available yet (the analysis issue)."""

from depthlab.cli import not_available

register = not_available("analyze", "the analysis issue")
