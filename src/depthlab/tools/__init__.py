"""Tools built on the model, training and analysis code: ``recipe`` (a depth-effective training config),
``doctor`` (diagnose a model's depth use) and ``prune`` (remove blocks)."""
