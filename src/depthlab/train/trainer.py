"""The training loop: one CPU, one GPU, or data-parallel ranks under torchrun.

A run folder holds ``config.yaml`` (fully resolved), ``tokenizer.json``, ``metrics.jsonl``, ``layer_stats.jsonl`` and
``checkpoints/``. Batches are a pure function of (seed, step, rank), so resuming from a checkpoint at step k continues
exactly as if never interrupted: same loss curve, same final weights (on CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from depthlab import __version__
from depthlab import checkpoint as ckpt
from depthlab import config as cfgmod
from depthlab.config import Config
from depthlab.data.tokenizer import save_tokenizer
from depthlab.errors import CheckpointError, ConfigError, Interrupted, TrainingError
from depthlab.fileio import atomic_write_text, dumps_json
from depthlab.model.moe import batch_routing
from depthlab.model.params import param_counts
from depthlab.model.transformer import Transformer
from depthlab.precision import resolve_device, resolve_dtype
from depthlab.rundir import RunDir
from depthlab.signals import deferred_stop
from depthlab.train import sparsity
from depthlab.train.distributed import Dist
from depthlab.train.loggers import Loggers
from depthlab.train.memory import check_fits
from depthlab.train.optim import build_optimizer, lr_at
from depthlab.train.stats import LayerStats, block_norms

# Keys that may differ between a run and its resumption: they change neither the model nor the data order.
RESUMABLE_DIFFERENCES = ("logging.", "trainer.device", "trainer.eval_interval", "trainer.save_interval",
                         "trainer.keep_last", "trainer.keep_every", "trainer.log_interval", "trainer.compile",
                         "trainer.stats_", "trainer.max_steps", "schedule.decay_steps")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float | None
    tokens: int


class JsonlLog:
    """Append-only JSON-lines log that, on resume, first drops lines newer than the resumed step (no duplicates)."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _line_step(line) is not None and _line_step(line) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._f = open(path, "a") if enabled else None  # noqa: SIM115 — held for the run; close() closes it

    def write(self, record: dict) -> None:
        if self.enabled:
            self._f.write(dumps_json(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled:
            self._f.close()


def _line_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line from a crash is dropped


def _device(name: str, dist: Dist) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    return device


def _resolve_data(cfg: Config):
    """Open the training dataset (preparing the bundled corpus on first use) and fix the vocabulary size."""
    from depthlab.data import TokenDataset, default_dataset

    path = Path(cfg.data.path) if cfg.data.path else default_dataset(cfg.data.vocab_size)
    dataset = TokenDataset(path)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = dataset.vocab_size
    elif cfg.model.vocab_size < dataset.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the dataset's tokenizer "
                          f"vocabulary ({dataset.vocab_size})")
    return dataset


def resume_config(run_dir: str | Path, overrides: dict | None = None) -> Config:
    """The config a run resumes with: its own ``config.yaml`` plus `overrides` of the keys that may change."""
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise CheckpointError(f"nothing to resume: {run_dir} holds no depthlab run")
    cfg = cfgmod.from_dict(run.read_config())
    cfgmod.apply_overrides(cfg, overrides or {})
    _check_resume(run.path, cfg)
    return cfgmod.validate(cfg)


def _check_resume(run_dir: Path, cfg: Config) -> None:
    """Refuse a resume that would change the model or the data order; apply the schedule rule of an extension.

    Raising ``trainer.max_steps`` extends a run without changing its past: the cosine decay still ends where it was
    planned to (``schedule.decay_steps`` := the original max_steps), and the extra steps run at the final rate
    ``alpha_f·lr``. max_steps may not shrink.
    """
    saved = RunDir(run_dir).read_config()
    differences = [d for d in cfgmod.diff(saved, cfg.to_dict()) if not d.startswith(RESUMABLE_DIFFERENCES)]
    if differences:
        raise ConfigError(f"cannot resume {run_dir}: config differs in keys that change the model or the data order "
                          f"({'; '.join(differences[:4])}{' …' if len(differences) > 4 else ''}); on resume only "
                          "trainer.max_steps, intervals, statistics, logging and the device may change")
    old_max = int(saved.get("trainer", {}).get("max_steps", cfg.trainer.max_steps))
    old_decay = int(saved.get("schedule", {}).get("decay_steps", 0) or 0)
    if cfg.trainer.max_steps < old_max:
        raise ConfigError(f"cannot resume {run_dir}: trainer.max_steps may only grow on resume (the run was "
                          f"planned for {old_max}, got {cfg.trainer.max_steps})")
    decay = old_decay or (old_max if cfg.trainer.max_steps > old_max else 0)
    if cfg.schedule.decay_steps not in (0, decay):
        raise ConfigError(f"cannot resume {run_dir}: schedule.decay_steps is {decay or 'trainer.max_steps'} for this "
                          f"run, got {cfg.schedule.decay_steps}")
    cfg.schedule.decay_steps = decay


def train(cfg: Config, out: str | Path, resume: bool = False) -> TrainResult:
    """Train `cfg` into run folder `out`; with `resume`, continue from its latest valid checkpoint.

    The run folder is locked for the whole call (a second writer is refused). Ctrl-C or SIGTERM stops after the
    current step with a checkpoint saved, raising `Interrupted`.
    """
    dist = Dist.from_env()
    try:
        with RunDir(out).lock("train") if dist.is_main else contextlib.nullcontext(), deferred_stop() as stop:
            return _train(cfg, Path(out), resume, dist, stop)
    finally:
        dist.close()


def _train(cfg: Config, run_dir: Path, resume: bool, dist: Dist, stop) -> TrainResult:
    t = cfg.trainer
    dataset = _resolve_data(cfg)
    cfgmod.validate(cfg)
    device = _device(t.device, dist)
    if t.batch_size % dist.world_size:
        raise ConfigError(f"trainer.batch_size ({t.batch_size}) must be divisible by the number of ranks "
                          f"({dist.world_size})")
    rank_batch = t.batch_size // dist.world_size
    micro = t.micro_batch_size or rank_batch
    if rank_batch % micro:
        raise ConfigError(f"per-rank batch ({rank_batch}) must be divisible by trainer.micro_batch_size ({micro})")
    n_micro = rank_batch // micro

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a run folder")
    run = RunDir(run_dir)
    ckpt_dir = run.checkpoints_dir
    start_step, state = 0, None
    if resume:
        if not run.started():
            raise CheckpointError(f"nothing to resume: {run_dir} holds no depthlab run")
        _check_resume(run_dir, cfg)
        checkpoints = ckpt.list_checkpoints(ckpt_dir)
        if checkpoints:
            latest = checkpoints[-1]
            ckpt.verify(latest)
            state = ckpt.load_trainer_state(latest)
            start_step = state["step"]
    elif run.checkpoints() or run.metrics_path.exists():
        raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it or choose another --out")

    check_fits(cfg, micro, device)
    # read (and checked against its sha256) before any work, so a damaged dataset tokenizer writes nothing
    tokenizer = None if run.tokenizer_path.exists() or not dist.is_main else dataset.tokenizer()
    torch.manual_seed(t.seed)
    model = Transformer(cfg.model).to(device)
    if state is not None:
        ckpt.load_model_weights(latest, model)
    train_model = dist.wrap(model, fsdp=t.fsdp)  # before the optimizer: FSDP replaces the parameters
    optimizer = build_optimizer(model, cfg.optimizer)
    if state is not None:
        dist.load_optimizer_state(model, optimizer, state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
    if t.compile:
        train_model = torch.compile(train_model)

    counts = param_counts(cfg.model)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if tokenizer is not None:
            save_tokenizer(tokenizer, run_dir)
        G = cfg.model.n_heads // cfg.model.kv_heads
        print(f"depthlab {__version__} | L={cfg.model.n_layers} d={cfg.model.d_model} G={G} "
              f"T={cfg.model.seq_len} | {counts.summary()} | {dist.world_size} rank(s) on {device} "
              f"({str(resolve_dtype(t.dtype, device)).removeprefix('torch.')}) "
              f"| {'resuming at step ' + str(start_step) if start_step else 'from scratch'}")
    metrics = JsonlLog(run.metrics_path, start_step if resume else None, dist.is_main)
    stats_log = JsonlLog(run.layer_stats_path, start_step if resume else None, dist.is_main)
    loggers = Loggers(cfg, run_dir) if dist.is_main else None

    train_tokens = dataset.split("train")
    val_tokens = dataset.split("val")
    from depthlab.data import sample_batch

    compute_dtype = resolve_dtype(t.dtype, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16)
    probe = _attention_probe(val_tokens, cfg, device) if t.stats_attention else None
    tokens_per_step = t.batch_size * cfg.model.seq_len
    step, loss_value, val_loss = start_step, float("nan"), None
    bar = tqdm(total=t.max_steps, initial=start_step, disable=not (dist.is_main and cfg.logging.progress),
               unit="step", dynamic_ncols=True, leave=True)
    window_start, window_steps = time.perf_counter(), 0
    while step < t.max_steps:
        lr = lr_at(step, cfg.schedule.decay_steps or t.max_steps, cfg.optimizer.lr, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        want_stats = t.stats_interval and ((step + 1) % t.stats_interval == 0 or step == 0)
        stats = LayerStats(cfg.model.n_layers, device, moments=t.stats_moments) if want_stats else None
        x, y = sample_batch(train_tokens, rank_batch, cfg.model.seq_len, seed=t.seed, step=step,
                            rank=dist.rank, world_size=dist.world_size)
        x, y = x.to(device), y.to(device)
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        # MoE load balancing uses the whole batch's expert counts in every micro-batch (exact accumulation).
        with batch_routing(model, x.split(micro), autocast):
            for m in range(n_micro):
                xs, ys = x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro]
                with dist.no_sync(train_model, last=m == n_micro - 1), autocast:
                    with stats.attached(model) if stats is not None else contextlib.nullcontext():
                        out = train_model(xs, ys)
                    (out.loss / n_micro).backward()
                loss_sum += out.loss.detach() / n_micro
                aux_sum += out.aux_loss.detach() / n_micro
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
                     if cfg.optimizer.grad_clip else _grad_norm(model))
        loss_sum = dist.mean(loss_sum)
        if not (math.isfinite(loss_sum.item()) and math.isfinite(float(grad_norm))):
            last = ckpt.list_checkpoints(ckpt_dir)
            where = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was saved yet"
            raise TrainingError(f"non-finite loss or gradient at step {step + 1}; stopping ({where})")
        extra = _optional_stats(model, t, probe) if stats is not None else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss_sum.item()
        window_steps += 1

        if stats is not None:
            record = {"step": step, "tokens": step * tokens_per_step, **stats.finish(extra)}
            stats_log.write(record)
            if loggers is not None:
                loggers.layer_stats(record)
        if step % t.log_interval == 0 or step == t.max_steps or step == 1:
            elapsed = time.perf_counter() - window_start
            tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
            record = {"step": step, "tokens": step * tokens_per_step, "loss": loss_value, "lr": lr,
                      "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
            if cfg.model.moe.num_experts:
                record["aux_loss"] = dist.mean(aux_sum).item()
            metrics.write(record)
            if loggers is not None:
                loggers.metrics(record)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
            window_start, window_steps = time.perf_counter(), 0
        bar.update(1)
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.max_steps):
            val_loss = evaluate_loss(model, val_tokens, cfg, micro, device, autocast, dist)
            record = {"step": step, "tokens": step * tokens_per_step, "val_loss": val_loss,
                      "val_ppl": math.exp(min(val_loss, 50))}
            metrics.write(record)
            if loggers is not None:
                loggers.metrics(record)
            bar.write(f"step {step}: val loss {val_loss:.4f} (ppl {record['val_ppl']:.2f})") if dist.is_main else None
        stopping = bool(stop) if not dist.enabled else dist.mean(torch.tensor(float(bool(stop)), device=device)).item() > 0
        if (t.save_interval and step % t.save_interval == 0) or step == t.max_steps or stopping:
            weights, optim_state = dist.full_state(model, optimizer)  # collective under FSDP
            if dist.is_main:
                saved = ckpt.save_checkpoint(ckpt_dir, step, weights, {
                    "step": step, "optimizer": optim_state, "rng_cpu": torch.get_rng_state(),
                    "version": __version__}, keep_last=t.keep_last, keep_every=t.keep_every)
            dist.barrier()
        if stopping and step < t.max_steps:
            bar.close()
            raise Interrupted(f"stopped by {stop.signal or 'another rank'} after step {step} of {t.max_steps}"
                              + (f"; checkpoint {saved} saved" if dist.is_main else ""))
    bar.close()
    metrics.close()
    stats_log.close()
    if loggers is not None:
        loggers.close()
    if dist.is_main and step == start_step:
        print(f"done: {run_dir} was already at step {step} (trainer.max_steps); nothing to train")
    elif dist.is_main:
        print(f"done: {run_dir} (step {step}, train loss {loss_value:.4f}"
              f"{f', val loss {val_loss:.4f}' if val_loss is not None else ''})")
    return TrainResult(run_dir, step, loss_value, val_loss, step * tokens_per_step)


def _attention_probe(val_tokens, cfg: Config, device) -> torch.Tensor:
    """The fixed probe batch of the attention statistics: the first validation windows, the same at every step."""
    from depthlab.data import eval_batches

    x, _ = next(eval_batches(val_tokens, sparsity.ATTENTION_PROBE_SEQUENCES, cfg.model.seq_len, 1))
    return x.to(device)


def _optional_stats(model: Transformer, t, probe: torch.Tensor | None) -> list[dict] | None:
    """The optional per-block statistics (gradient norms, weight sparsity, attention sparsity), one dict per block."""
    parts = []
    if t.stats_grad_norms:
        parts.append(block_norms(model, grads=True))
    if t.stats_weight_sparsity:
        parts.append(sparsity.weight_sparsity_by_block(model))
    if t.stats_attention:
        parts.append(sparsity.attention_sparsity_by_layer(model, probe))
    return [{k: v for d in per_block for k, v in d.items()} for per_block in zip(*parts)] if parts else None


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())


@torch.no_grad()
def evaluate_loss(model: Transformer, val_tokens, cfg: Config, micro: int, device, autocast, dist: Dist) -> float:
    """Mean next-token loss over the first `eval_batches` global batches of validation windows (fixed)."""
    from depthlab.data import eval_batches

    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)  # [loss sum, tokens]
    # The same windows whatever the micro-batch size and number of ranks: eval_batches × batch_size of them.
    n_windows = cfg.trainer.eval_batches * cfg.trainer.batch_size
    for x, y in eval_batches(val_tokens, micro, cfg.model.seq_len, max_batches=n_windows // micro,
                             rank=dist.rank, world_size=dist.world_size):
        with autocast:
            loss = model(x.to(device), y.to(device)).ce_loss
        sums += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), device=device)])
    model.train()
    total = dist.mean(sums) * dist.world_size
    return (total[0] / total[1]).item()
