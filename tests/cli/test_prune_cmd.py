"""`depthlab prune`: a trained run pruned end to end (report, printed table, reloaded logits); one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from depthlab.cli import main
from depthlab.loading import load_model
from tests.tools.test_prune import logits, skipped_logits


def test_cli_prune_end_to_end_on_a_depthlab_run(depthlab_run, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(depthlab_run), "--drop", "auto", "--n", "1", "--seq-len", "32", "--num-samples", "4",
                 "--eval-samples", "4", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    assert report["n_layers_after"] == 3 and len(report["dropped"]) == 1 and report["saved_as"] == "hf"
    assert report["dropped"][0] == min(range(4), key=report["selection_scores"].__getitem__)
    assert f"| perplexity | {report['before']['perplexity']:.3f} | {report['after']['perplexity']:.3f} |" in printed
    model, tok = load_model(depthlab_run)
    reloaded, _ = load_model(out)
    ids = torch.tensor([tok.encode("thou art the king of all land")])
    torch.testing.assert_close(logits(reloaded, ids), skipped_logits(model, ids, report["dropped"]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("drop, message", [("0-3", "cannot drop all 4 blocks"), ("4", "block 4 is out of range"),
                                           ("1;2", "malformed block list")])
def test_cli_prune_bad_block_lists_are_one_line_errors(hf_folder, tmp_path, capsys, drop, message):
    assert main(["prune", str(hf_folder), "--drop", drop, "--out", str(tmp_path / "x"), "--seq-len", "32",
                 "--no-progress"]) == 2
    stderr = capsys.readouterr().err.replace("\r", "\n")  # transformers may draw a loading progress bar too
    err = [line for line in stderr.splitlines() if line.startswith("depthlab")]
    assert len(err) == 1 and err[0].startswith("depthlab prune: error:") and message in err[0]
    assert not (tmp_path / "x").exists()


def test_prune_computing_in_bf16_saves_the_source_precision(depthlab_run, tmp_path, capsys):
    """Scoring may run in bf16 (auto on GPUs and AMX CPUs); the saved blocks are the fp32 source's, bit for bit."""
    out = tmp_path / "pruned"
    assert main(["prune", str(depthlab_run), "--drop", "auto", "--n", "1", "--seq-len", "32", "--num-samples", "4",
                 "--eval-samples", "4", "--dtype", "bf16", "--out", str(out), "--no-progress", "-q"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["dtype"] == "bf16" and report["saved_dtype"] == "fp32"
    model, tok = load_model(depthlab_run)
    reloaded, _ = load_model(out)
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    ids = torch.tensor([tok.encode("thou art the king of all land")])
    torch.testing.assert_close(logits(reloaded, ids), skipped_logits(model, ids, report["dropped"]),
                               rtol=1e-4, atol=1e-4)
