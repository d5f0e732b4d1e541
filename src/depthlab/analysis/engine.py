"""The analysis engine: one definition of "block l" for every supported model, one baseline pass, resumable stacks.

Every metric in depthlab.analysis is written against three operations (SPEC §1):

* ``Engine.baselines()`` streams micro-batches of the intact run. Each ``Baseline`` holds the residual stream
  ``h_0..h_L`` (block inputs and the last block's output, captured with hooks on the block modules — never HF
  ``output_hidden_states``), the per-token next-token NLL (its LM head runs when a metric first reads it, so
  causal effects and the usefulness fit pass never pay for it), optionally each block's branch outputs (the tensors
  added to the stream, after any post-sub-layer norm), and the exact arguments every block received (position
  embeddings, masks), so any block can be re-run in isolation.
* ``Engine.resume(base, start, h, plan)`` runs positions ``start..L-1`` from a stream ``h`` with overrides: skip a
  block, replace it by a function, run another block's weights at a position (swap), drop a sub-layer. Position
  metadata (RoPE tables, masks, LayerNorm-Scaling factor, norm placement, layer index) belongs to the *position*:
  a swap moves only the block's weights (``ModelView.run``), so swapped or skipped blocks never shift it.
  ``Engine.resume_many(base, runs)`` runs several such interventions of one micro-batch side by side: at each
  position the runs that execute the same block there are stacked along the batch dimension into one call of at
  most ``resume_tokens`` tokens — the same block evaluations in fewer, taller calls (per-call overhead of
  re-entering a decoder layer and small-matmul inefficiency paid once per group, not once per intervention).
* ``Engine.token_nll(h_L, ids)`` applies the final norm and LM head in row chunks.

Everything structural (block list, final norm, LM head, branches, positions) comes from
`depthlab.model.view.ModelView`, ``Engine.stack``; a one-time check that our own ``final(h_L)`` reproduces the
model's logits guards against families with extra output logic.
Baselines are kept in memory while they fit ``cache_budget_mb`` and recomputed otherwise, so memory stays bounded.

**Placed models.** A model spread over devices or offloaded by accelerate (`depthlab.model.dispatch`) runs each block
where it lives: the block's hook moves its input there (and loads offloaded weights for the call). The engine keeps
every state — h_l, branch outputs, block outputs — on one *state device* (where the embedding computes), so metrics
combine states of different blocks without caring where the blocks are, and it stores each block's call arguments
(RoPE tables, masks) on that block's device once, so they are not copied on every resumed call. The head runs where
it lives (`ModelView.final` returns its logits on the state device). The numbers are those of the model on one
device: the same weights run in the same order, only on other devices.

**Data parallel.** With ``data_parallel=True`` under an initialised ``torch.distributed`` process group (torchrun),
each of the W ranks runs the baselines of its contiguous share of the sequences (rank r: rows r·N//W ..
(r+1)·N//W − 1, so no rank is empty when N ≥ W; ``Baseline.first`` is a micro-batch's global row), and a metric
all-reduces its token sums (``all_sum``, fp64; ``all_max`` for maxima) before dividing, so every rank ends with the
numbers of one process over all sequences, up to the order of the fp64 additions. Statistics that are not sums —
resampling, grouping — are defined over global sequence indices: ``gather_sequences`` gives every rank the
per-sequence vector of all N sequences (each rank adds its rows into zeros, so it is exact), which it then
resamples or groups exactly as one process would. Metrics that do this are listed in ``DATA_PARALLEL_METRICS``;
the others (``tuned_lens``, whose translators are trained by minibatch steps, not summed) are refused under data
parallelism.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from depthlab.errors import AnalysisError
from depthlab.model.dispatch import execution_device, is_dispatched
from depthlab.model.view import ModelView

HEAD_CHUNK_TOKENS = 2048
RESUME_TOKENS = 8192
"""Default token bound of one stacked block call in `Engine.resume_many` (bounds its activation memory)."""
DATA_PARALLEL_METRICS = ("variance", "angular", "usefulness", "causal", "permutation", "jacobian", "weight_sparsity",
                         "attention_sparsity", "moe", "lens", "branches")
"""Metrics whose token sums are all-reduced over data-parallel ranks (see the module docstring); weight_sparsity
reads only the weights, the same on every rank."""
REDUCE_CHUNK_VALUES = 2**26
"""`all_sum` / `all_max` reduce this many fp64 values at a time, so the transient copy of a large sum (the
usefulness normal equations) stays at 512 MB."""


def _first_tensor(out):
    return out[0] if isinstance(out, tuple | list) else out


@dataclass
class Baseline:
    """One micro-batch of the intact run."""

    index: int
    first: int
    """Global index (row of input_ids) of its first sequence."""
    ids: torch.Tensor
    """Token ids [B, T] of this micro-batch."""
    hs: list[torch.Tensor]
    """h_0..h_L: block inputs plus the last block's output (pre-final-norm)."""
    calls: list[tuple[tuple, dict]]
    """The extra positional and keyword arguments block l received (position embeddings, masks, ...)."""
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(repr=False)
    """`Engine.token_nll`, which `nll` applies to h_L on first use."""
    branches: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """Optional branch outputs per layer ("attn", "ffn"), as added to the stream; None where unavailable."""

    @functools.cached_property
    def nll(self) -> torch.Tensor:
        """Per-token next-token NLL [B, T-1] in fp32, computed when first read: metrics that never read it
        (causal, the usefulness fit pass) never pay for the LM head."""
        return self.head(self.hs[-1], self.ids)

    def nbytes(self) -> int:
        nll = [self.__dict__["nll"]] if "nll" in self.__dict__ else []
        tensors = [*self.hs, *nll, *(t for v in self.branches.values() for t in v if t is not None)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Drop:
    """Run the block at this position with one of its branches ("attn" | "ffn") removed (output zeroed)."""

    branch: str


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the last block has run."""


class Engine:
    """Shared baseline + resumable block stack for one model and one token sample (see module docstring)."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, *, micro_batch_size: int = 8,
                 cache_budget_mb: float = 2048.0, data_parallel: bool = False, resume_tokens: int = RESUME_TOKENS):
        self.stack = ModelView(model)
        """The structural view of the model (blocks, head, branches, positions)."""
        self.model = model.eval()
        self.input_ids = validate_ids(input_ids, self.stack)
        if micro_batch_size < 1:
            raise AnalysisError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.micro_batch_size = micro_batch_size
        self.cache_budget = int(cache_budget_mb * 2**20)
        self.resume_tokens = resume_tokens
        """`resume_many` stacks interventions into block calls of at most this many tokens (≤ B·T: one per call)."""
        self.device = execution_device(model if self.stack.embedding is None else self.stack.embedding)
        """The state device: where the token ids, the cached states and every block output live."""
        self.dtype = next(model.parameters()).dtype
        self._block_devices = [execution_device(b) for b in self.stack.blocks] if is_dispatched(model) else None
        self._cache: dict[int, Baseline] = {}
        self._verified = False
        self.rank, self.world = data_parallel_world() if data_parallel else (0, 1)
        """This process's rank and the number of data-parallel ranks (0, 1 without data parallelism)."""
        check_data_parallel((), self.input_ids.shape[0], self.world)
        n = self.input_ids.shape[0]
        self.sequences = range(self.rank * n // self.world, (self.rank + 1) * n // self.world)
        """This rank's sequences (rows of input_ids): all of them without data parallelism."""

    @property
    def n_layers(self) -> int:
        return self.stack.n_layers

    @property
    def num_batches(self) -> int:
        """Micro-batches of this rank's sequences."""
        return -(-len(self.sequences) // self.micro_batch_size)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the data-parallel ranks in fp64 (`t` itself without data parallelism)."""
        return self._reduce(t, "SUM")

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of `t` over the data-parallel ranks."""
        return self._reduce(t, "MAX")

    def gather_sequences(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sequence values of this rank's sequences [..., len(sequences)] → those of all sequences [..., N] in
        order, the same on every rank (fp64; `t` itself without data parallelism)."""
        if self.world == 1:
            return t
        full = torch.zeros(*t.shape[:-1], self.input_ids.shape[0], dtype=torch.float64, device=t.device)
        full[..., self.sequences.start:self.sequences.stop] = t
        return self.all_sum(full)  # every other rank adds zeros there: exact

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        on = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        out = t.detach().to(torch.float64, memory_format=torch.contiguous_format, copy=True)
        flat = out.view(-1)
        for i in range(0, flat.numel(), REDUCE_CHUNK_VALUES):
            buf = flat[i:i + REDUCE_CHUNK_VALUES].to(on)  # a view of `out` when it is already there
            dist.all_reduce(buf, op=getattr(dist.ReduceOp, op))
            flat[i:i + REDUCE_CHUNK_VALUES] = buf
        return out

    def release(self) -> None:
        """Drop cached baselines (the next metric recomputes what it needs)."""
        self._cache.clear()

    # ---------------------------------------------------------------------------------------------------------- #
    def baselines(self, *, branches: bool = False) -> Iterator[Baseline]:
        """Micro-batches of the intact run, in order; cached while they fit the budget, recomputed otherwise."""
        for i in range(self.num_batches):
            base = self._cache.get(i)
            if base is None or (branches and not base.branches):
                self._cache.pop(i, None)
                base = self._run_baseline(i, branches)
                if sum(b.nbytes() for b in self._cache.values()) + base.nbytes() <= self.cache_budget:
                    self._cache[i] = base
            yield base

    @torch.no_grad()
    def _run_baseline(self, index: int, branches: bool) -> Baseline:
        start = self.sequences.start + index * self.micro_batch_size
        rows = slice(start, min(start + self.micro_batch_size, self.sequences.stop))
        ids = self.input_ids[rows].to(self.device)
        stack, L = self.stack, self.n_layers
        hs: list = [None] * (L + 1)
        calls: list = [None] * L
        outs: dict[str, list] = {"attn": [None] * L, "ffn": [None] * L} if branches else {}
        # Located before any hook is set: the first lookup runs the view's probe forward.
        located = {name: [stack.branch(layer, name) for layer in range(L)] for name in outs}
        verify = not self._verified

        def pre_hook(layer):
            def hook(module, args, kwargs):
                kwargs = dict(kwargs)
                h = args[0] if args else kwargs.pop("hidden_states")
                hs[layer] = h.detach().to(self.device)
                calls[layer] = self._placed((tuple(args[1:]), kwargs), layer)
            return hook

        def post_hook(module, args, kwargs, out):
            hs[L] = _first_tensor(out).detach().to(self.device)
            if not verify:
                raise _Stop

        def branch_hook(name, layer, scale):
            def hook(module, args, out):
                # A copy: some families add into a branch output in place (Falcon's parallel mlp_output += attn).
                y = _first_tensor(out).detach()
                y = y.clone() if scale == 1.0 else y * scale
                outs[name][layer] = y.to(self.device)
            return hook

        handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(stack.blocks)]
        handles.append(stack.blocks[-1].register_forward_hook(post_hook, with_kwargs=True))
        for name, found in located.items():
            for layer, branch in enumerate(found):
                if branch is not None:  # unavailable branches stay None (see ModelView.branch_unavailable)
                    handles.append(branch.module.register_forward_hook(branch_hook(name, layer, branch.scale)))
        kwargs = dict(stack.forward_kwargs)
        if verify and "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            kwargs["logits_to_keep"] = 1  # the check needs a few rows of the head, not all B·T (HF heads)
        try:
            out = self.model(ids, **kwargs)
        except _Stop:
            out = None
        finally:
            for h in handles:
                h.remove()
        if any(c is None for c in calls) or hs[L] is None:
            raise AnalysisError(f"{type(self.model).__name__} did not run all {L} located blocks in order; "
                                "depthlab cannot analyse this architecture")
        if verify:
            self._verify_final(hs[L], out)
        return Baseline(index, start, ids, hs, calls, self.token_nll, outs)

    def _placed(self, call: tuple[tuple, dict], layer: int) -> tuple[tuple, dict]:
        """A block's call arguments on that block's device (unchanged for a model on one device)."""
        if self._block_devices is None:
            return call
        from accelerate.utils import send_to_device

        return send_to_device(call, self._block_devices[layer])

    def _verify_final(self, h_last: torch.Tensor, out) -> None:
        logits = getattr(out, "logits", out)
        ours = self.stack.final(h_last[:, -logits.shape[1]:]).float()  # the positions the model's logits cover
        theirs = logits.float()
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        err = (ours - theirs).abs().max().item() / max(theirs.abs().max().item(), 1e-6)
        if ours.shape != theirs.shape or err > tol:
            raise AnalysisError(f"final norm + LM head of {type(self.model).__name__} do not reproduce its logits "
                                f"(relative error {err:.2g}); its output layer needs an adapter in "
                                "ModelView.final (depthlab/model/view.py)")
        self._verified = True

    # ---------------------------------------------------------------------------------------------------------- #
    def run_block(self, base: Baseline, position: int, h: torch.Tensor, *, block: int | None = None,
                  drop: str | None = None, copies: int = 1) -> torch.Tensor:
        """Run block `block`'s weights (default: the one at `position`) at `position` with that position's metadata
        (call arguments, LNS factor, norm placement, layer index: see `ModelView.run`); `h` may hold `copies`
        streams of the micro-batch stacked along the batch dimension."""
        args, kwargs = base.calls[position]
        if copies > 1:
            args, kwargs = _repeat_rows((args, kwargs), base.ids.shape[0], copies)
        if drop is None:
            return _first_tensor(self.stack.run(position, h, args, kwargs, block=block)).to(self.device)
        branch = self.stack.branch(position, drop)
        if branch is None:
            raise AnalysisError(f"cannot drop the {drop} branch of block {position}: "
                                f"{self.stack.branch_unavailable(position)}")
        handle = branch.module.register_forward_hook(lambda m, a, out: _zeros_like_output(out))
        try:
            return _first_tensor(self.stack.run(position, h, args, kwargs, block=block)).to(self.device)
        finally:
            handle.remove()

    @torch.no_grad()
    def resume(self, base: Baseline, start: int, h: torch.Tensor, plan: dict | None = None,
               on_output: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Run positions start..L-1 from stream `h` and return h_L.

        `plan` maps a position to what runs there instead of its own block: ``None`` skips it (identity), an int
        runs that block's weights, a callable ``x -> y`` replaces it, a ``Drop`` removes one of its branches.
        `on_output(position, input, output)` sees every position's input and output.
        """
        seen = None if on_output is None else (lambda p, members, x, y: on_output(p, x, y))
        return self.resume_many(base, [(start, h, plan)], seen)[0]

    @torch.no_grad()
    def resume_many(self, base: Baseline, runs: list[tuple[int, torch.Tensor, dict | None]],
                    on_output: Callable[[int, list[int], torch.Tensor, torch.Tensor], None] | None = None
                    ) -> list[torch.Tensor]:
        """`resume` for several interventions on one micro-batch side by side; returns each run's h_L.

        `runs` holds (start, h, plan) per intervention, h a stream [B, T, d] of `base`. Position by position, the
        runs that do the same there (the same block's weights, a skip, the same Drop; a callable runs alone) are
        stacked along the batch dimension into block calls of at most `resume_tokens` tokens: the same rows through
        the same weights, one call instead of one per run (equal to separate calls up to the summation order of a
        taller matmul). Memory: one stream per run (L runs hold one baseline's states) plus one call's activations.
        `on_output(position, members, x, y)` sees the stacked inputs and outputs [k·B, T, d] of the runs `members`
        (indices into `runs`, in stacking order) at `position`.
        """
        hs = [h for _, h, _ in runs]
        plans = [plan or {} for _, _, plan in runs]
        B, T = base.ids.shape
        per_call = max(1, self.resume_tokens // (B * T))
        for p in range(min((start for start, _, _ in runs), default=self.n_layers), self.n_layers):
            groups: dict = {}
            for r, (start, _, _) in enumerate(runs):
                if start <= p:
                    action = plans[r].get(p, p)
                    key = action if action is None or isinstance(action, int | Drop) else ("callable", r)
                    groups.setdefault(key, []).append(r)
            batchable = per_call > 1 and _batchable(base.calls[p], B)
            for members in groups.values():
                for i in range(0, len(members), per_call if batchable else 1):
                    chunk = members[i:i + (per_call if batchable else 1)]
                    x = hs[chunk[0]] if len(chunk) == 1 else torch.cat([hs[r] for r in chunk])
                    action = plans[chunk[0]].get(p, p)
                    if action is None:
                        y = x
                    elif isinstance(action, int):
                        y = self.run_block(base, p, x, block=action, copies=len(chunk))
                    elif isinstance(action, Drop):
                        y = self.run_block(base, p, x, drop=action.branch, copies=len(chunk))
                    else:
                        y = action(x)
                    if on_output is not None:
                        on_output(p, chunk, x, y)
                    for r, part in zip(chunk, y.split(B) if len(chunk) > 1 else (y,)):
                        hs[r] = part
        return hs

    @torch.no_grad()
    def token_nll(self, h_last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token NLL [B, T-1] in fp32 from the pre-final-norm stream, head applied in row chunks."""
        B, T, d = h_last.shape
        x = h_last[:, :-1].reshape(-1, d)
        targets = ids[:, 1:].reshape(-1).to(x.device)
        out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for i in range(0, x.shape[0], HEAD_CHUNK_TOKENS):
            logits = self.stack.final(x[i:i + HEAD_CHUNK_TOKENS]).float()
            out[i:i + HEAD_CHUNK_TOKENS] = nn.functional.cross_entropy(
                logits, targets[i:i + HEAD_CHUNK_TOKENS], reduction="none")
        return out.view(B, T - 1)


def _batchable(call, rows: int) -> bool:
    """Whether a block's call arguments can serve stacked copies of a micro-batch of `rows` rows: every tensor of
    two or more dimensions is per-row (first dimension `rows`) or broadcast (1); not so e.g. for Bloom's ALiBi
    tensor [B·heads, 1, T]."""
    if isinstance(call, torch.Tensor):
        return call.dim() < 2 or call.shape[0] in (1, rows)
    if isinstance(call, tuple | list):
        return all(_batchable(v, rows) for v in call)
    if isinstance(call, dict):
        return all(_batchable(v, rows) for v in call.values())
    return True


def _repeat_rows(call, rows: int, copies: int):
    """A block's call arguments for `copies` stacked copies of its micro-batch: per-row tensors repeated."""
    if isinstance(call, torch.Tensor):
        return call.repeat(copies, *[1] * (call.dim() - 1)) if call.dim() >= 2 and call.shape[0] == rows > 1 else call
    if isinstance(call, tuple | list):
        return type(call)(_repeat_rows(v, rows, copies) for v in call)
    if isinstance(call, dict):
        return {k: _repeat_rows(v, rows, copies) for k, v in call.items()}
    return call


def _zeros_like_output(out):
    if isinstance(out, tuple):
        return (torch.zeros_like(out[0]), *out[1:])
    return torch.zeros_like(out)


def data_parallel_world() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_data_parallel(metrics, num_sequences: int, world: int, fit_sequences: int | None = None) -> None:
    """Refuse data parallelism over more ranks than sequences (or than `fit_sequences`, the usefulness/branches fit
    sample, when given), or for metrics that do not reduce over ranks."""
    if world == 1:
        return
    if num_sequences < world:
        raise AnalysisError(f"{world} data-parallel ranks need at least {world} sequences, got {num_sequences}: "
                            "use fewer ranks or more --num-samples")
    if fit_sequences is not None and fit_sequences < world:
        raise AnalysisError(f"{world} data-parallel ranks need at least {world} fit sequences, got {fit_sequences}: "
                            "use fewer ranks or more --fit-samples")
    other = [m for m in metrics if m not in DATA_PARALLEL_METRICS]
    if other:
        raise AnalysisError(f"{', '.join(other)} cannot run data-parallel (only {', '.join(DATA_PARALLEL_METRICS)} "
                            "reduce over ranks): run it in one process")


def validate_ids(input_ids, stack: ModelView) -> torch.Tensor:
    """Check a token sample: LongTensor [N, T], T >= 2, within the context and the vocabulary."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise AnalysisError("input_ids must be a 2-D tensor [num_sequences, seq_len]")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise AnalysisError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    N, T = input_ids.shape
    if N < 1 or T < 2:
        raise AnalysisError(f"need at least 1 sequence of at least 2 tokens, got shape {tuple(input_ids.shape)}")
    if stack.context is not None and T > stack.context:
        raise AnalysisError(f"sequence length {T} exceeds the model's context of {stack.context} tokens")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= stack.vocab_size:
        bad = lo if lo < 0 else hi
        raise AnalysisError(f"token id {bad} is outside the model's vocabulary of {stack.vocab_size}")
    return input_ids.long()


def get_engine(model, input_ids, engine: Engine | None, micro_batch_size: int, cache_budget_mb: float) -> Engine:
    """The shared engine when `analyze` passes one, else a fresh one for a single metric call."""
    if engine is not None:
        if engine.model is not model or not torch.equal(engine.input_ids, torch.as_tensor(input_ids).long()):
            raise AnalysisError("the engine passed belongs to a different model or token sample")
        return engine
    return Engine(model, input_ids, micro_batch_size=micro_batch_size, cache_budget_mb=cache_budget_mb)
