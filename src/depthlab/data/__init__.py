"""Data: corpora → tokenizer + packed token shards → deterministic batches, and calibration samples for analysis.

    path = prepare_data("shakespeare", "data/shakespeare", vocab_size=4096)
    ds = TokenDataset(path)
    x, y = sample_batch(ds.split("train"), batch_size=32, seq_len=128, seed=0, step=0)
    input_ids, provenance = calibration_sample(tokenizer)      # held-out text for `depthlab analyze`

See docs/data.md for sources, the folder layout and the determinism guarantees.
"""

from depthlab.data.calibration import calibration_sample, calibration_samples, run_heldout, token_sha256
from depthlab.data.dataset import TokenDataset
from depthlab.data.prepare import (
    cache_dir,
    default_dataset,
    default_dataset_dir,
    prepare_data,
    split_documents,
)
from depthlab.data.sampling import eval_batches, sample_batch
from depthlab.data.sources import (
    HELDOUT_PLAYS,
    Corpus,
    Document,
    markdown_to_text,
    open_source,
    shakespeare_corpus,
)
from depthlab.data.tokenizer import EOT, load_tokenizer, train_bpe

__all__ = [
    "EOT", "HELDOUT_PLAYS", "Corpus", "Document", "TokenDataset", "cache_dir", "calibration_sample",
    "calibration_samples",
    "default_dataset", "default_dataset_dir", "eval_batches", "load_tokenizer", "markdown_to_text", "open_source",
    "prepare_data", "run_heldout", "sample_batch", "shakespeare_corpus", "split_documents", "token_sha256", "train_bpe",
]
