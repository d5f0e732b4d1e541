"""`depthlab train`: not available yet (the training issue)."""

from depthlab.cli import not_available

register = not_available("train", "the training issue")
