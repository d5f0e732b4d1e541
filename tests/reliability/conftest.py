"""Fixtures of the reliability suite: a finished tiny run and a folder of malformed inputs beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Hub ids must fail fast and the same way on every machine: never reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`, files with their size and modification time (ns): equal snapshots mean nothing was
    created, changed or deleted. Folder mtimes are left out: a lock file created and removed again is no change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def workspace(tiny_dataset, tmp_path_factory):
    """A folder with a trained 2-step tiny run (`run/`), its config (`cfg.yaml`) and malformed files of every kind."""
    from depthlab.train.trainer import train

    root = tmp_path_factory.mktemp("workspace")
    cfg = tiny_config(tiny_dataset, "--trainer.max_steps=2", "--trainer.eval_interval=0")
    write_config(cfg, root / "cfg.yaml")
    train(cfg, root / "run")
    files = {
        "bad.yaml": "model: [unclosed\n",
        "list.yaml": "- 1\n- 2\n",
        "type.yaml": "model:\n  n_layers: four\n",
        "afile": "not a folder\n",
        "bad.jsonl": "{not json\n",
        "nofield.jsonl": '{"body": "text under the wrong key"}\n',
        "hfbad/config.json": "{not json",
        "hfnoweights/config.json": json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
        "baddata/meta.json": "garbage",
        "spec_badkey.yaml": "name: s\nfoo: 1\ngrid: {model.n_layers: [2]}\n",
        "spec_badgrid.yaml": "name: s\ngrid: {model.n_layerz: [2]}\n",
        "spec_badmetric.yaml": "name: s\ngrid: {model.n_layers: [2]}\nmeasure: {analysis: [nope]}\n",
        "spec_badtask.yaml": "name: s\ngrid: {model.n_layers: [2]}\nmeasure: {eval_tasks: [nope]}\n",
        "spec_notmap.yaml": "[1, 2]\n",
        "spec_badval.yaml": "name: s\ngrid: {model.n_layers: [0]}\n",
        "spec_seeds.yaml": "name: s\ngrid: {model.n_layers: [2]}\nseeds: [a]\n",
        "spec_both.yaml": "name: s\ngrid: {model.n_layers: [2]}\nruns: [{model.n_layers: 2}]\n",
        "spec_limit.yaml": "name: s\ngrid: {model.n_layers: [2]}\nmeasure: {eval_limit: -3}\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x80garbage")
    (root / "empty").mkdir()
    _corrupt_models(root, tiny_dataset)
    (root / "dangling").symlink_to(root / "nowhere")
    return root


def _corrupt_models(root: Path, tiny_dataset: Path) -> None:
    """Damaged model files of every kind: GGUF (garbage, header only, truncated), an HF folder whose safetensors is
    not one, runs with a torn tokenizer.json / config.yaml, datasets whose meta.json is a list or whose tokenizer.json
    is torn, and an analysis folder whose results.json is a list."""
    import shutil

    from depthlab.loading import alias_path

    (root / "garbage.gguf").write_bytes(b"not a gguf file\n")
    (root / "header.gguf").write_bytes(b"GGUF")
    with open(alias_path("smollm2"), "rb") as f:
        (root / "truncated.gguf").write_bytes(f.read(4096))
    shutil.copytree(root / "hfnoweights", root / "hfbadweights")
    (root / "hfbadweights" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    for name, damaged, text in (("torntok", "tokenizer.json", '{"version": "1.0", "trunc'),
                                ("torncfg", "config.yaml", "model: [1\n"), ("emptycfg", "config.yaml", "")):
        shutil.copytree(root / "run", root / name)
        (root / name / damaged).write_text(text)
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "empty.txt").write_text("")
    (root / "empty.jsonl").write_text("")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), root / "empty.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), root / "inttext.parquet")
    shutil.copytree(tiny_dataset, root / "listmeta")
    (root / "listmeta" / "meta.json").write_text("[1]\n")
    shutil.copytree(tiny_dataset, root / "tornmeta_tok")
    (root / "tornmeta_tok" / "tokenizer.json").write_text("{")
    (root / "listresults").mkdir()
    (root / "listresults" / "results.json").write_text("[1, 2]\n")


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    """A read-only tmpfs (None where mounting is not allowed)."""
    import subprocess

    path = tmp_path_factory.mktemp("readonly")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(path)], check=False,
                      capture_output=True).returncode:
        yield None
        return
    yield path
    subprocess.run(["umount", str(path)], check=False)
