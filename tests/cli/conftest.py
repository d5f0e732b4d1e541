"""Fixtures of the command-line tests: the tools' tiny models (a trained 4-block depthlab run and a 4-block Hugging
Face Llama folder with its tokenizer), shared with tests/tools/ rather than built twice."""

from tests.tools.conftest import depthlab_run, hf_folder, tokenizer  # noqa: F401 — fixtures, found by name
