"""Tools built on the model, training and analysis code: the recipe generator (``depthlab recipe``)."""
