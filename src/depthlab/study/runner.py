"""Running a study: one folder per run, each trained and measured in its own process, resumable and fault-isolated.

Study folder layout::

    STUDY/study.yaml                 the resolved spec; a rerun with a different spec is refused
    STUDY/runs/NAME/run.json         what the run is: setting, seed, full config, measurements
    STUDY/runs/NAME/config.yaml, metrics.jsonl, layer_stats.jsonl, checkpoints/   (the trainer's run folder)
    STUDY/runs/NAME/eval/results.json, analysis/results.json                      (measurements)
    STUDY/runs/NAME/dynamics/step_NNNNNN/results.json   the analysis of an earlier checkpoint (measure.dynamics)
    STUDY/runs/NAME/baselines.json   unigram and add-one bigram cross-entropy on the run's validation windows
    STUDY/runs/NAME/log.txt          stdout and stderr of every attempt
    STUDY/runs/NAME/done.json        written atomically last: the run is finished and is skipped from now on
    STUDY/runs/NAME/failed.json      the error of the last attempt (a rerun retries the run, resuming it), and the
                                     seconds spent so far, which done.json's wall time includes
    STUDY/runs/NAME/running.json     pid and host of the attempt in progress

Each run is a subprocess (``python -m depthlab.study.runner RUN_DIR``, or the same module under ``torchrun`` for
multi-GPU runs), so a crash, an out-of-memory kill or a bad setting fails that run only. A run interrupted at any
point resumes from its latest checkpoint, and finished measurements are not repeated.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import yaml

from depthlab.checkpoint import checkpoint_name
from depthlab.errors import StudyError
from depthlab.fileio import atomic_write_text, dumps_json
from depthlab.rundir import RunDir
from depthlab.study.spec import StudySpec, check_dynamics, dynamics_steps, load_spec, spec_difference

STATES = ("done", "running", "failed", "interrupted", "pending")
ANALYSIS_DIR = "analysis"
"""The folder of each run that the runner writes its analysis to (RUN/analysis/results.json)."""
LOCKED_EXIT = 75
"""Exit code of a run process that found its run folder locked by another `study run` (EX_TEMPFAIL)."""
DESCRIPTIVE = ("description:", "runtime:", "gpu_hours:",
               "config.trainer.save_interval:", "config.trainer.keep_last:", "config.trainer.keep_every:")
"""Spec keys that do not change results (descriptions, and checkpoint retention, which `check_dynamics` validates
when the spec is loaded): editing them does not make a study folder a different study."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, value: dict) -> None:
    atomic_write_text(path, dumps_json(value, indent=1, default=str) + "\n")


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or unreadable (e.g. torn by a kill)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# The study folder


def prepare_study(spec: StudySpec, out: str | Path) -> list[Path]:
    """Create (or check) the study folder for `spec` and every run's ``run.json``; returns the run folders.

    A folder already holding a different spec is refused with the differing keys, so two studies never mix.
    """
    out = Path(out)
    recorded_path = out / "study.yaml"
    current = spec.to_dict()
    all_differences: list[str] = []
    if recorded_path.exists():
        recorded = yaml.safe_load(recorded_path.read_text()) or {}
        all_differences = spec_difference(recorded, current)
        differences = [d for d in all_differences if not d.startswith(DESCRIPTIVE)]
        if differences:
            shown = "; ".join(differences[:6]) + (f"; … ({len(differences)} in all)" if len(differences) > 6 else "")
            raise StudyError(f"{out} holds a different study spec ({shown}): use another --out, or the original spec")
    if not recorded_path.exists() or all_differences:  # new, or an edited description/runtime
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(recorded_path, yaml.safe_dump(current, sort_keys=False, allow_unicode=True))
    folders = []
    for index, run in enumerate(spec.resolve()):
        folder = out / "runs" / run.name
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "run.json").exists():
            _write_json(folder / "run.json", {"name": run.name, "index": index, "study": spec.name,
                                              "label": run.label, "setting": run.setting,
                                              "seed": run.seed, "config": run.config,
                                              "measure": current["measure"]})
        folders.append(folder)
    return folders


def run_state(run_dir: Path) -> str:
    """done | running | failed | interrupted (an attempt died without a word) | pending."""
    if (run_dir / "done.json").exists():
        return "done"
    running = read_json(run_dir / "running.json")
    if running is not None:
        if running.get("host") != socket.gethostname() or _pid_alive(int(running.get("pid", -1))):
            return "running"
        return "interrupted"
    if (run_dir / "failed.json").exists():
        return "failed"
    return "interrupted" if RunDir(run_dir).started() else "pending"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_runs(study_dir: str | Path) -> list[Path]:
    """The run folders of a study folder, in spec order."""
    study_dir = Path(study_dir)
    if not (study_dir / "study.yaml").exists():
        raise StudyError(f"{study_dir} is not a study folder (no study.yaml)")
    found = [(info.get("index", 0), folder) for folder in (study_dir / "runs").glob("*")
             if (info := read_json(folder / "run.json")) is not None]
    return [folder for _, folder in sorted(found)]


def study_status(study_dir: str | Path) -> dict[str, str]:
    """{run name: state} for every run of a study folder, in spec order."""
    return {folder.name: run_state(folder) for folder in list_runs(study_dir)}


def format_status(states: dict[str, str], study_dir: str | Path) -> str:
    counts = {s: sum(1 for v in states.values() if v == s) for s in STATES}
    lines = [f"{study_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" ({len(states)} runs)"]
    for name, state in states.items():
        line = f"  {state:<12} {name}"
        if state == "failed":
            error = (read_json(Path(study_dir) / "runs" / name / "failed.json") or {}).get("error", "")
            line += f"  ({error.splitlines()[0][:100] if error else 'no error recorded'})"
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# One run (in its own process)


def execute_run(run_dir: str | Path, log=print) -> dict[str, Any]:
    """Train and measure the run in `run_dir` (prepared by `prepare_study`) in this process; write done.json.

    Resumes training from the latest checkpoint and skips finished measurements. Any exception is recorded in
    failed.json (message and traceback) and re-raised. Under torchrun every rank trains; rank 0 alone measures and
    writes the markers.
    """
    run_dir = Path(run_dir)
    info = read_json(run_dir / "run.json")
    if info is None:
        raise StudyError(f"{run_dir} has no readable run.json: prepare it with 'depthlab study run'")
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return _train(run_dir, info)
    # A retry resumes the failed attempts' work, so the run's wall time is the sum over its attempts.
    earlier = read_json(run_dir / "failed.json") or {}
    earlier_seconds, attempt = earlier.get("seconds", 0.0), earlier.get("attempt", 0) + 1
    (run_dir / "failed.json").unlink(missing_ok=True)
    _write_json(run_dir / "running.json", {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()})
    start, load_start = time.perf_counter(), _load_average()

    def seconds() -> float:
        return round(earlier_seconds + time.perf_counter() - start, 3)

    try:
        result = _train(run_dir, info)
        measured = _measure(run_dir, info, log)
        done = {"name": info["name"], "finished": _now(), "seconds": seconds(), "attempts": attempt,
                "load_average": {"start": load_start, "end": _load_average()}, **result, "measured": measured}
        _write_json(run_dir / "done.json", done)
        return done
    except BaseException as e:
        _write_json(run_dir / "failed.json", {"name": info["name"], "error": f"{type(e).__name__}: {e}",
                                              "traceback": traceback.format_exc(), "log": "log.txt",
                                              "failed": _now(), "seconds": seconds(), "attempt": attempt})
        raise
    finally:
        (run_dir / "running.json").unlink(missing_ok=True)


def _load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (wall times are only comparable at similar load)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _train(run_dir: Path, info: dict) -> dict[str, Any]:
    from depthlab import config as cfgmod
    from depthlab.train.trainer import train

    cfg = cfgmod.from_dict(info["config"])
    cfg.logging.progress = False  # logs go to a file; the trainer still prints its evaluation lines
    result = train(cfg, run_dir, resume=RunDir(run_dir).started())
    return {"step": result.step, "tokens": result.tokens}


def _applicable(metrics: list[str], info: dict) -> list[str]:
    """The study's metrics that apply to this run: a study comparing dense and MoE runs lists ``moe`` for all of
    them, and the router statistics do not exist for the dense ones (analyze refuses an explicit ``moe`` there)."""
    dense = not info["config"]["model"]["moe"]["num_experts"]
    return [m for m in metrics if not (dense and m == "moe")]


def _measure(run_dir: Path, info: dict, log) -> list[str]:
    """Baselines, evaluation, analysis and the analysis of earlier checkpoints of the trained run; each is skipped
    when its results already exist."""
    import torch

    measure = info["measure"]
    data_path = info["config"]["data"]["path"] or None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    done = []
    # The analysis' evaluation and fit samples, the same at every checkpoint (older run.json lack the fit keys).
    sample = {"data": data_path, "num_samples": measure["analysis_samples"], "seq_len": measure["analysis_seq_len"],
              "fit_samples": measure.get("fit_samples"), "fit_seq_len": measure.get("fit_seq_len"),
              "options": measure["analysis_options"], "progress": False, "device": device, "log": log}
    if not (run_dir / "baselines.json").exists():
        from depthlab.study.baselines import run_baselines

        _write_json(run_dir / "baselines.json", run_baselines(info["config"]))
    done.append("baselines")
    if measure["eval_tasks"] or measure["perplexity"]:
        results_path = run_dir / "eval" / "results.json"
        if not results_path.exists():
            from depthlab.eval import evaluate, save_results
            from depthlab.loading import load_model

            model, tokenizer = load_model(run_dir, device=device)
            results = evaluate(model, tokenizer, tasks=measure["eval_tasks"] or None, limit=measure["eval_limit"],
                               ppl_data=(data_path or "shakespeare") if measure["perplexity"] else None,
                               model_name=info["name"])
            save_results(results, run_dir / "eval")
            del model
        done.append("eval")
    if measure["analysis"]:
        from depthlab.analysis import run_analysis

        run_analysis(str(run_dir), run_dir / ANALYSIS_DIR, metrics=_applicable(measure["analysis"], info), **sample)
        done.append("analysis")
    steps = dynamics_steps(measure.get("dynamics", []), info["config"]["trainer"]["max_steps"])
    if steps and measure.get("dynamics_analysis"):
        from depthlab.analysis import run_analysis

        for step in steps:
            checkpoint = RunDir(run_dir).checkpoints_dir / checkpoint_name(step)
            if not checkpoint.is_dir():
                raise StudyError(f"checkpoint {checkpoint} is gone (trainer.keep_every changed?): cannot measure "
                                 f"step {step} of the training dynamics")
            run_analysis(str(checkpoint), run_dir / "dynamics" / checkpoint.name,
                         metrics=_applicable(measure["dynamics_analysis"], info), **sample)
        done.append("dynamics")
    return done


# ----------------------------------------------------------------------------------------------------------------
# Many runs


def launch_command(run_dir: str | Path, nproc_per_node: int = 1, python: str = sys.executable) -> list[str]:
    """The command line that executes one prepared run: plain Python, or torchrun with `nproc_per_node` ranks."""
    if nproc_per_node > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
                "-m", "depthlab.study.runner", str(run_dir)]
    return [python, "-m", "depthlab.study.runner", str(run_dir)]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_study(spec: StudySpec | str | Path, out: str | Path | None = None, *, scale: str | None = None,
              jobs: int = 1, only: list[str] | None = None, nproc_per_node: int = 1,
              overrides: dict[str, Any] | None = None, log=print) -> dict[str, str]:
    """Run every unfinished run of a study (a StudySpec, built-in name or YAML path) into `out`.

    overrides: dotted config keys applied to every run on top of the spec's config (e.g. ``{"data.path": ...}``);
    they become part of the recorded spec, so a rerun must pass them again.
    jobs: runs executed at once, each a subprocess with OMP_NUM_THREADS = cores / (jobs · nproc_per_node) (at most
    the caller's OMP_NUM_THREADS when set) and, on
    a multi-GPU machine, its own GPUs. only: run just these run names (a cluster job per run). Finished runs are
    skipped; failed or interrupted ones are retried and resume. Returns {run name: final state}; a failed run does not
    stop the others.
    """
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec, scale)
    if overrides:
        swept = set(spec.grid or {}).union(*(set(e) for e in spec.runs or []), {"trainer.seed"})
        if set(overrides) & swept:
            raise StudyError(f"{', '.join(sorted(set(overrides) & swept))} is set by every run of study "
                             f"'{spec.name}' (its grid, runs or seeds): an override would be ignored; edit the spec")
        spec = dataclasses.replace(spec, config={**spec.config, **overrides})
        check_dynamics(spec)  # every run's config must still be valid and keep its dynamics checkpoints
    if jobs < 1 or nproc_per_node < 1:
        raise StudyError(f"--jobs and --nproc-per-node must be >= 1, got {jobs} and {nproc_per_node}")
    out = Path(out) if out is not None else Path("studies") / (spec.name + (f"-{spec.scale}" if spec.scale else ""))
    if only:
        names = [run.name for run in spec.resolve()]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise StudyError(f"no run named {', '.join(map(repr, unknown))} in study '{spec.name}'; runs: "
                             f"{', '.join(names)}")
    folders = prepare_study(spec, out)
    if only:
        folders = [f for f in folders if f.name in only]
    todo = []
    for folder in folders:
        state = run_state(folder)
        if state == "done":
            log(f"skip   {folder.name} (done)")
        elif state == "running":
            log(f"skip   {folder.name} (running in another process)")
        else:
            todo.append(folder)
    _run_pool(todo, jobs, nproc_per_node, log)
    states = {f.name: run_state(f) for f in folders}
    failed = [n for n, s in states.items() if s != "done"]
    log(f"study {spec.name}: {len(states) - len(failed)}/{len(states)} runs done in {out}"
        + (f"; not done: {', '.join(failed)}" if failed else ""))
    return states


def smoke_spec(spec: StudySpec, steps: int = 2, all_runs: bool = False) -> StudySpec:
    """`spec` cut to a smoke test of its code paths: `steps` training steps (checkpoint every step, no compile),
    measurements on a handful of examples (adjacent permutation pairs, 2 Jacobian probes), and only its largest run
    (most parameters × context) unless `all_runs`."""
    if steps < 1:
        raise StudyError(f"--steps must be >= 1, got {steps}")
    config = {**spec.config, "trainer.max_steps": steps, "trainer.save_interval": 1, "trainer.keep_every": 1,
              "trainer.eval_interval": steps, "trainer.compile": False}
    options = {**spec.measure.analysis_options, "permutation": {"pairs": "adjacent"},
               "jacobian": {**spec.measure.analysis_options.get("jacobian", {}), "probes": 2}}
    measure = dataclasses.replace(spec.measure, eval_limit=4, analysis_samples=min(2, spec.measure.analysis_samples),
                                  analysis_options=options)
    smoke = dataclasses.replace(spec, name=f"{spec.name}-smoke", config=config, measure=measure)
    if not all_runs:
        from depthlab import config as cfgmod
        from depthlab.model.params import param_counts

        def size(run):
            model = cfgmod.from_dict(run.config).model
            return param_counts(model).total * model.seq_len

        largest = max(smoke.resolve(), key=size)
        smoke = dataclasses.replace(smoke, grid=None, runs=[{"name": largest.label, **largest.setting}],
                                    seeds=[0])
    check_dynamics(smoke)
    return smoke


def smoke(names: list[str], out: str | Path, *, scale: str = "small", steps: int = 2, all_runs: bool = False,
          log=print) -> dict[str, dict[str, str]]:
    """Run `smoke_spec` of each built-in study `names` at `scale` into ``out/NAME-SCALE-smoke`` (what
    ``depthlab study smoke`` and the GPU check script run); returns {study: {run: state}}."""
    return {name: run_study(smoke_spec(load_spec(name, scale), steps, all_runs), Path(out) / f"{name}-{scale}-smoke",
                            log=log) for name in names}


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run_pool(todo: list[Path], jobs: int, nproc_per_node: int, log) -> None:
    """Run the folders as subprocesses, `jobs` at a time; record a failure for a process that died silently."""
    jobs = max(1, min(jobs, len(todo)))  # slots beyond the runs would only be allocated (--jobs 10^11)
    threads = max(1, _cores() // (jobs * nproc_per_node))
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's own cap (e.g. on a shared machine) wins
        threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    gpus = _gpu_count() if todo else 0
    free_slots = list(range(jobs))
    active: dict[subprocess.Popen, tuple[Path, int, Any, float]] = {}
    queue = list(todo)
    try:
        while queue or active:
            while queue and free_slots:
                folder, slot = queue.pop(0), free_slots.pop(0)
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                if gpus >= (slot + 1) * nproc_per_node and jobs > 1:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(
                        str(g) for g in range(slot * nproc_per_node, (slot + 1) * nproc_per_node))
                logfile = open(folder / "log.txt", "a")  # noqa: SIM115 (closed when the process ends)
                logfile.write(f"\n===== attempt started {_now()} =====\n")
                logfile.flush()
                proc = subprocess.Popen(launch_command(folder, nproc_per_node), stdout=logfile,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
                active[proc] = (folder, slot, logfile, time.perf_counter())
                log(f"start  {folder.name} (pid {proc.pid}, {threads} thread(s))")
            time.sleep(0.2)
            for proc in [p for p in active if p.poll() is not None]:
                folder, slot, logfile, started = active.pop(proc)
                logfile.close()
                free_slots.append(slot)
                _finish(folder, proc.returncode, time.perf_counter() - started, log)
    finally:
        for proc, (folder, _, logfile, _) in active.items():  # interrupted: stop our children, keep their work
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logfile.close()
            _finish(folder, proc.returncode, 0.0, lambda _: None)


def _finish(folder: Path, returncode: int, seconds: float, log) -> None:
    if returncode == LOCKED_EXIT:
        log(f"skip   {folder.name} (running in another process)")
        return
    if (folder / "done.json").exists():
        log(f"done   {folder.name} ({seconds:.0f}s)")
        return
    if not (folder / "failed.json").exists():
        why = f"killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
        _write_json(folder / "failed.json", {"name": folder.name, "error": f"process {why} before finishing",
                                             "traceback": _tail(folder / "log.txt"), "log": "log.txt",
                                             "failed": _now()})
    (folder / "running.json").unlink(missing_ok=True)
    error = (read_json(folder / "failed.json") or {}).get("error", "")
    log(f"FAILED {folder.name}: {error.splitlines()[0] if error else ''} (see {folder / 'log.txt'})")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    """``python -m depthlab.study.runner RUN_DIR``: execute one prepared run (what the pool and torchrun launch)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m depthlab.study.runner RUN_DIR", file=sys.stderr)
        return 2
    import contextlib

    from depthlab.errors import FileSystemError
    from depthlab.rundir import folder_lock

    with contextlib.ExitStack() as held:
        try:
            if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 holds it for all ranks
                held.enter_context(folder_lock(argv[0], "study run"))
        except FileSystemError as e:  # another `study run` is executing this run: leave it alone
            print(f"run skipped: {e}", file=sys.stderr)
            return LOCKED_EXIT
        try:
            execute_run(argv[0])
        except Exception as e:  # noqa: BLE001 (any error fails this run only; failed.json holds it)
            print(f"run failed: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc()
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
