"""Run the `depthlab` command line with one injected crash: SIGKILL of this process at an exact point.

Usage: ``python crash_hook.py ARGS...`` with ``DEPTHLAB_TEST_KILL=POINT:STEP`` in the environment. SIGKILL cannot be
caught, so the process dies as on a power cut or an OOM kill: no `finally`, no flush, no cleanup. Points:

- ``batch:S``  before training step S runs (its batch is being drawn);
- ``pause:S``  same place, but write the file ``$DEPTHLAB_TEST_MARKER`` and sleep so that the test kills it from
  outside;
- ``log:S``    halfway through writing the metrics.jsonl line of step S (a torn last line);
- ``model:S``  while checkpoint S is written: model.safetensors holds half its bytes;
- ``state:S``  after checkpoint S's trainer_state.pt, before meta.json (a complete-looking .tmp folder without meta);
- ``rename:S`` with checkpoint S complete in its .tmp folder, just before the rename into place;
- ``prune:S``  just after checkpoint S is renamed into place, before older checkpoints are pruned;
- ``metric:N`` (analyze) right after the N-th finished metric is saved, before results.json is updated.

The patches only wrap the functions to kill at the point; what they compute is untouched. Kept in the test tree:
the product has no fault-injection code.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, at: int) -> None:
    """Patch depthlab so that this process SIGKILLs itself at `point` of training step (or checkpoint) `at`."""
    import torch

    import depthlab.data
    from depthlab import checkpoint as ckpt
    from depthlab.train import trainer

    tmp_name = f"step_{at:06d}.tmp"
    if point in ("batch", "pause"):
        real_sample = depthlab.data.sample_batch

        def sample_batch(*args, step: int, **kw):
            if step + 1 == at:  # the trainer draws step k's batch with step=k-1 (steps count from 1 in logs)
                if point == "pause":
                    Path(os.environ["DEPTHLAB_TEST_MARKER"]).write_text(str(os.getpid()))
                    time.sleep(600)
                die()
            return real_sample(*args, step=step, **kw)

        depthlab.data.sample_batch = sample_batch
    elif point == "log":
        real_write = trainer.JsonlLog.write

        def write(self, record: dict) -> None:
            if record.get("step") == at and "loss" in record and self.path.name == "metrics.jsonl":
                line = json.dumps(record)
                self._f.write(line[: len(line) // 2])
                self._f.flush()
                die()
            real_write(self, record)

        trainer.JsonlLog.write = write
    elif point == "model":
        real_save_file = ckpt.save_file

        def save_file(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            if Path(filename).parent.name == tmp_name:
                os.truncate(filename, os.path.getsize(filename) // 2)
                die()

        ckpt.save_file = save_file
    elif point == "state":
        real_torch_save = torch.save

        def save(obj, f, *args, **kw):
            real_torch_save(obj, f, *args, **kw)
            if Path(f).parent.name == tmp_name:
                die()

        torch.save = save
    elif point == "rename":
        real_replace = os.replace

        def replace(src, dst):
            if Path(src).name == tmp_name:
                die()
            real_replace(src, dst)

        os.replace = replace
    elif point == "prune":
        real_fsync_dir = ckpt.fsync_dir

        def fsync_dir(path):
            real_fsync_dir(path)
            if (Path(path) / f"step_{at:06d}").is_dir():
                die()

        ckpt.fsync_dir = fsync_dir
    elif point == "metric":
        from depthlab.analysis import runner

        real_write_atomic, saved = runner.atomic_write_text, []

        def write_atomic(path, text):
            real_write_atomic(path, text)
            if Path(path).parent.name == "metrics":
                saved.append(path)
                if len(saved) == at:
                    die()

        runner.atomic_write_text = write_atomic
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # the same arithmetic as the in-process reference run
    spec = os.environ.get("DEPTHLAB_TEST_KILL")
    if spec:
        point, _, at = spec.partition(":")
        install(point, int(at))
    from depthlab.cli import main

    sys.exit(main(sys.argv[1:]))
