"""Loading never executes code from a file: weights come from safetensors or `torch.load(weights_only=True)`, remote
code only with the explicit flag, and report pages escape what users wrote.

A pickle whose unpickling would create a marker file is planted where depthlab looks for state (a checkpoint's
trainer_state.pt, an HF folder's pytorch_model.bin); the marker must never appear.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import yaml

from depthlab import checkpoint as ckpt
from depthlab.cli import main
from depthlab.errors import CheckpointError, ModelLoadError
from depthlab.loading import load_model
from tests.conftest import tiny_config
from tests.reliability.conftest import write_config

SRC = Path(__file__).resolve().parents[2] / "src" / "depthlab"
UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("yaml", "load"), ("yaml", "unsafe_load"),
                ("marshal", "loads"), ("dill", "load"), ("joblib", "load")}


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            yield node, owner, name


def test_source_tree_has_no_unsafe_deserialisation_or_default_remote_code():
    problems = []
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40
    for path in files:
        for node, owner, name in calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            keywords = {k.arg: k.value for k in node.keywords}
            if (owner, name) == ("torch", "load"):
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if (owner, name) in UNSAFE_CALLS or (isinstance(node.func, ast.Name) and name in ("eval", "exec")):
                problems.append(f"{where}: {owner + '.' if owner else ''}{name}")
            remote = keywords.get("trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is not False:
                problems.append(f"{where}: trust_remote_code={remote.value!r} (must come from the user's flag)")
    assert problems == []


class Payload:
    """Unpickling this runs `touch MARKER`: a stand-in for arbitrary code in a downloaded checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"step": 2, "optimizer": Payload(marker)}, protocol=2))


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    from depthlab.train.trainer import train

    root = tmp_path_factory.mktemp("safe")
    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=2", "--trainer.eval_interval=0")
    write_config(cfg, root / "cfg.yaml")
    train(cfg, root / "run")
    return root / "run"


def test_pickle_payload_in_a_checkpoint_is_never_executed(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    assert not Path(marker).exists()
    latest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    state = latest / ckpt.STATE_FILE
    original, meta_text = state.read_bytes(), (latest / ckpt.META_FILE).read_text()
    try:
        plant(state, marker)
        meta = json.loads(meta_text)  # an attacker rewrites the checksum too: the checksum is no defence here
        meta["sha256"][ckpt.STATE_FILE] = hashlib.sha256(state.read_bytes()).hexdigest()
        (latest / ckpt.META_FILE).write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match="cannot read"):
            ckpt.load_trainer_state(latest)
        assert main(["train", str(run.parent / "cfg.yaml"), "--out", str(run), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "trainer_state.pt" in err
        assert load_model(run)[0] is not None  # the model itself is safetensors: it loads
        assert not marker.exists(), "unpickling executed the payload"
    finally:
        state.write_bytes(original)
        (latest / ckpt.META_FILE).write_text(meta_text)


def test_pickle_weights_in_a_hugging_face_folder_are_never_read(run, tmp_path):
    from depthlab.model.hf import export_hf

    marker = tmp_path / "pwned"
    hf = export_hf(run, tmp_path / "hf")
    plant(hf / "pytorch_model.bin", marker)
    load_model(hf)  # safetensors present: the .bin beside it is ignored
    assert not marker.exists()
    (hf / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(hf)
    assert not marker.exists(), "a pickle checkpoint was unpickled"


def test_report_escapes_hostile_user_strings(tmp_path):
    from depthlab.study.report import write_report
    from tests.study.conftest import make_run

    hostile = "<script>alert(1)</script>"
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.yaml").write_text(yaml.safe_dump({"name": "s", "description": hostile, "reference": "depth",
                                                      "seeds": [0], "knobs": ["model.n_layers"], "base": None}))
    make_run(study, "a", label=hostile, n_layers=2, seed=0, val_ppl=30.0, out_var=[[1.0, 2.0]])
    make_run(study, "b", label="b", n_layers=3, seed=0, val_ppl=30.0, out_var=[[1.0, 2.0, 3.0]], state="failed")
    (study / "runs" / "b" / "failed.json").write_text(json.dumps({"error": hostile}))
    html_path, md_path = write_report(study)
    for page in (html_path.read_text(), md_path.read_text()):  # a Markdown renderer passes raw HTML through
        assert hostile not in page and "alert(1)</script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
