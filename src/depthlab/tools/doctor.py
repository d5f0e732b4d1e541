"""`depthlab doctor`: a quick diagnosis of how well a model uses its depth, and which recipe levers it lacks.

It runs the fast subset of the analysis (SPEC §5) on a small seeded calibration sample — variance profile, angular
distance, usefulness (linear replacement) and a Rademacher estimate of each block's Jacobian distance from the
identity — plus the weight-only and attention sparsity measurements, and turns them into a short report:

* effective depth: the blocks whose linear replacement raises the loss by more than τ;
* near-identity blocks: input and output almost parallel (angular distance < 0.05, i.e. cos > 0.988) or a Jacobian
  close to the identity (||M − I||_F < 0.25·||I||_F);
* variance growth with depth: least-squares fits of log-variance vs l (exponential) and of variance vs l (linear),
  compared on the log scale (relative error: variance spans orders of magnitude), with the growth rates;
* sparsity: GQA group size and MoE density k/E from the config, attention entropy, weight sparsity;
* the recipe levers (`depthlab.tools.recipe`) the model does not use.

Every metric runs through `depthlab.analysis.analyze`. The usefulness maps are fitted on a separate sample of
FIT_TOKENS_PER_COEF·(d+1) tokens, disjoint from the evaluation sample (or cross-fitted over given `input_ids`);
when a map saw fewer than 10·(d+1) tokens the scores are unreliable and `diagnose` refuses to
report useful blocks from them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from depthlab.analysis import analyze
from depthlab.analysis.defaults import NEAR_IDENTITY_ANGLE, default_fit_samples
from depthlab.analysis.replacement import require_reliable
from depthlab.analysis.results import to_jsonable
from depthlab.data import calibration_samples
from depthlab.data.calibration import token_sha256
from depthlab.errors import AnalysisError
from depthlab.fileio import atomic_write_text, dumps_json
from depthlab.model.view import ModelView
from depthlab.provenance import provenance
from depthlab.tools.recipe import CONTEXT, GQA_GROUP, WEIGHT_DECAY

NEAR_IDENTITY_JACOBIAN = 0.25
"""A block is near-identity when ||M − I||_F / ||I||_F (= jacobian_norm·sqrt(d)) is below this."""
MOE_DENSITY = 1 / 8
"""The recipe's MoE density k/E."""


@dataclass
class Diagnosis:
    model: str
    n_layers: int
    d_model: int
    sample: dict
    """Provenance of the calibration sample (source, seed, sizes, token hash)."""
    tau: float
    loss_ratios: list[float]
    useful_blocks: list[int]
    undecided_blocks: list[int]
    """Blocks whose loss-ratio interval contains 1 + tau (`Usefulness.undecided`)."""
    angular_distance: list[float]
    jacobian_norm: list[float]
    """||M − I||_F / d per block (position-summed Jacobian, Rademacher estimate)."""
    near_identity: list[dict]
    """{layer, angular_distance, jacobian_rel, reasons} for each near-identity block."""
    out_var: list[float]
    growth: dict | None
    """Variance-vs-depth fits: {exponential: {rate, factor, r2_log}, linear: {slope, r2_log}, better}; None for
    models with fewer than 3 blocks."""
    sparsity: dict
    levers: list[dict]
    """{lever, recipe, model, status: present|absent|unknown}."""
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    """Seconds spent in each measurement."""
    provenance: dict = field(default_factory=dict)
    """`depthlab.provenance`: date, command, device, dtype, versions, the model's origin (e.g. GGUF Q4_1)."""

    @property
    def effective_depth(self) -> int:
        return len(self.useful_blocks)

    def to_dict(self) -> dict:
        return to_jsonable({**asdict(self), "effective_depth": self.effective_depth})

    def render(self) -> str:
        """The human-readable report `depthlab doctor` prints."""
        s = self.sample
        lines = [(f"model {self.model}: {self.n_layers} blocks, d={self.d_model}; sample {s['num_samples']}x"
                 f"{s['seq_len']} tokens (seed {s['seed']}), {self.seconds:.0f}s ("
                 + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()) + ")")]
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(f"effective depth: {self.effective_depth} of {self.n_layers} blocks useful "
                     f"(loss ratio > 1+{self.tau:g} when linearly replaced): {_ranges(self.useful_blocks)}")
        if self.undecided_blocks:
            lines.append(f"undecided (the loss-ratio interval contains 1+{self.tau:g}; more samples narrow it): "
                         f"{_ranges(self.undecided_blocks)}")
        worst = sorted(range(self.n_layers), key=self.loss_ratios.__getitem__)[:5]
        lines.append("least useful blocks: " + ", ".join(f"{l} ({self.loss_ratios[l]:.3f})" for l in worst))
        if self.near_identity:
            lines.append(f"near-identity blocks ({len(self.near_identity)}): " + ", ".join(
                f"{b['layer']} ({'/'.join(b['reasons'])})" for b in self.near_identity))
        else:
            lines.append("near-identity blocks: none")
        g = self.growth
        if g is None:
            lines.append(f"variance vs depth: too few blocks to fit a growth law; last-block variance "
                         f"{self.out_var[-1]:.4g}")
        else:
            e, li = g["exponential"], g["linear"]
            lines.append(f"variance vs depth: {g['better']} fits better (R² on log-variance: exponential "
                         f"{e['r2_log']:.3f}, linear {li['r2_log']:.3f}); exponential rate {e['rate']:.3f}/block "
                         f"(x{e['factor']:.3f} per block), linear slope {li['slope']:.4g}/block; "
                         f"last-block variance {self.out_var[-1]:.4g}")
        sp = self.sparsity
        moe = "dense FFN" if sp["moe"] is None else (f"MoE k/E = {sp['moe']['top_k']}/{sp['moe']['num_experts']} "
                                                     f"= {sp['moe']['density']:.3f}")
        lines.append(f"sparsity: GQA G = {_fmt(sp['gqa_group'])}; {moe}; attention entropy "
                     f"{sp['attention_entropy']:.3f} nats (normalised {sp['attention_normalized_entropy']:.3f}, "
                     f"effective support {sp['attention_effective_support']:.1f} keys); weights: "
                     f"{sp['weight_frac_below_1e-3_max']:.2%} below 1e-3·max|w|, Hoyer {sp['weight_hoyer']:.3f}")
        lines.append("recipe levers:")
        for lever in self.levers:
            lines.append(f"  [{lever['status']:>7}] {lever['lever']}: model {lever['model']}, recipe {lever['recipe']}")
        return "\n".join(lines)


def _fmt(value) -> str:
    return "unknown" if value is None else f"{value:g}"


def _ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0-2,5,7-8' (or 'none')."""
    if not blocks:
        return "none"
    parts, start = [], blocks[0]
    for prev, cur in zip(blocks, [*blocks[1:], None]):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def growth_fits(out_var: list[float]) -> dict:
    """Fit var_l ≈ a·exp(r·l) (least squares on log var) and var_l ≈ a + b·l; say which fits log-variance better.

    Both are judged by R² on log-variance, i.e. by relative error, so the huge late-layer values do not decide alone.
    Linear predictions that fall to or below zero are floored at the smallest measured variance.
    """
    v = torch.tensor(out_var, dtype=torch.float64)
    if len(v) < 3 or (v <= 0).any():
        raise AnalysisError("variance growth needs at least 3 blocks with positive variance")
    depth = torch.arange(len(v), dtype=torch.float64)
    design = torch.stack([torch.ones_like(depth), depth], 1)
    log_v = v.log()
    exp_coef = torch.linalg.lstsq(design, log_v[:, None]).solution[:, 0]
    lin_coef = torch.linalg.lstsq(design, v[:, None]).solution[:, 0]

    def r2(pred_log):
        ss_res = ((log_v - pred_log) ** 2).sum()
        ss_tot = ((log_v - log_v.mean()) ** 2).sum()
        return (1 - ss_res / ss_tot).item() if ss_tot > 0 else 1.0

    r2_exp = r2(design @ exp_coef)
    r2_lin = r2((design @ lin_coef).clamp_min(v.min()).log())
    rate = exp_coef[1].item()
    return {"exponential": {"rate": rate, "factor": math.exp(rate), "r2_log": r2_exp},
            "linear": {"slope": lin_coef[1].item(), "intercept": lin_coef[0].item(), "r2_log": r2_lin},
            "better": "exponential" if r2_exp > r2_lin else "linear (sub-exponential)"}


def model_shape(view: ModelView) -> dict:
    """Heads, KV heads, MoE experts and context window, as the model's view reads them."""
    return {"n_heads": view.n_heads, "n_kv_heads": view.n_kv_heads, "num_experts": view.num_experts,
            "top_k": view.top_k, "context": view.context}


def training_weight_decay(model) -> float | None:
    """λ from the run config of a depthlab model loaded from a run folder; None when unknown (HF models)."""
    checkpoint = getattr(model, "checkpoint_path", None)
    if checkpoint is None:
        return None
    from depthlab import config as cfgmod
    from depthlab.rundir import RunDir

    run = RunDir.of(checkpoint)
    if not run.started():
        return None
    return cfgmod.from_dict(run.read_config()).optimizer.weight_decay


def recipe_levers(shape: dict, weight_decay: float | None) -> list[dict]:
    """Each recipe lever with the model's value and present / absent / unknown."""
    def status(known, present):
        return "unknown" if not known else ("present" if present else "absent")

    context, heads, kv = shape["context"], shape["n_heads"], shape["n_kv_heads"]
    group = heads / kv if heads and kv else None
    density = shape["top_k"] / shape["num_experts"] if shape["num_experts"] else None
    return [
        {"lever": "long context", "recipe": f"T >= {CONTEXT}", "model": _fmt(context),
         "status": status(context is not None, (context or 0) >= CONTEXT)},
        {"lever": "weight decay", "recipe": f"lambda ~ {WEIGHT_DECAY}",
         "model": "unknown (no training config: Hugging Face checkpoints do not record it)" if weight_decay is None else f"{weight_decay:g}",
         "status": status(weight_decay is not None, (weight_decay or 0) > 0)},
        {"lever": "GQA", "recipe": f"G = {GQA_GROUP}", "model": f"G = {_fmt(group)}",
         "status": status(group is not None, (group or 1) > 1)},
        {"lever": "MoE", "recipe": f"k/E = 1/{round(1 / MOE_DENSITY)}",
         "model": "dense FFN" if density is None else f"k/E = {shape['top_k']}/{shape['num_experts']}",
         "status": "present" if density is not None else "absent"},
    ]


def diagnose(model, tokenizer=None, input_ids: torch.Tensor | None = None, *, fit_ids: torch.Tensor | None = None,
             num_samples: int = 8, seq_len: int = 128, seed: int = 0, data=None, tau: float = 0.10, probes: int = 8,
             jacobian_samples: int = 2, micro_batch_size: int = 8, name: str | None = None,
             progress: bool = False) -> Diagnosis:
    """Diagnose `model` on `input_ids` [N, T] (or a seeded calibration sample drawn with `tokenizer`, with a
    disjoint usefulness fit sample of FIT_TOKENS_PER_COEF·(d+1) tokens; given `input_ids` without `fit_ids` are
    cross-fitted). Unreliable usefulness scores (too few fit tokens per map) are an AnalysisError.

    The Jacobian estimate (probes Rademacher vectors, no power iteration) runs on the first `jacobian_samples`
    sequences only: it is the costliest part and its summaries need far fewer tokens than the usefulness fit.
    """
    start = time.perf_counter()
    if input_ids is None:
        if tokenizer is None:
            raise AnalysisError("diagnose needs input_ids or a tokenizer to draw a calibration sample")
        fit_samples = default_fit_samples(ModelView(model).d_model, seq_len)
        input_ids, fit_ids, sample = calibration_samples(tokenizer, data, num_samples, seq_len, fit_samples,
                                                         seed=seed)
    else:
        sample = {"source": "given input_ids", "seed": None, "num_samples": input_ids.shape[0],
                  "seq_len": input_ids.shape[1], "token_sha256": token_sha256(input_ids)}
    if jacobian_samples < 1:
        raise AnalysisError(f"jacobian_samples must be >= 1, got {jacobian_samples}")
    view = ModelView(model)
    L, d = view.n_layers, view.d_model
    warnings: list[str] = []
    timings = {}
    clock = [time.perf_counter()]

    def timed(name, result):
        timings[name] = round(time.perf_counter() - clock[0], 2)
        clock[0] = time.perf_counter()

    common = {"micro_batch_size": micro_batch_size, "progress": progress, "on_result": timed}
    res = analyze(model, input_ids, ["variance", "angular", "usefulness"], fit_ids=fit_ids,
                  options={"usefulness": {"tau": tau}}, **common)  # with intervals: undecided blocks are named
    var, ang, use = res["variance"], res["angular"], res["usefulness"]
    require_reliable(use, "doctor")
    jac = analyze(model, input_ids[:jacobian_samples], ["jacobian"], options={"jacobian": {
        "mode": "estimate", "probes": probes, "power_iters": 0, "seed": seed}}, **common)["jacobian"]
    res = analyze(model, input_ids[:micro_batch_size], ["attention_sparsity", "weight_sparsity"], **common)
    att, ws = res["attention_sparsity"], res["weight_sparsity"]

    jn = [row["jacobian_norm"] for row in jac.layers]
    near = []
    for l in range(L):
        rel = jn[l] * math.sqrt(d)
        reasons = [r for r, hit in (("cos", ang.angular_distance[l] < NEAR_IDENTITY_ANGLE),
                                    ("J", rel < NEAR_IDENTITY_JACOBIAN)) if hit]
        if reasons:
            near.append({"layer": l, "angular_distance": ang.angular_distance[l], "jacobian_rel": rel,
                         "reasons": reasons})
    shape = model_shape(view)
    sizes = torch.tensor([m["size"] for m in ws.matrices], dtype=torch.float64)
    frac = torch.tensor([m["frac_below_rel_0.001"] for m in ws.matrices], dtype=torch.float64)
    hoy = torch.tensor([m["hoyer"] for m in ws.matrices], dtype=torch.float64)
    sparsity = {
        "gqa_group": shape["n_heads"] / shape["n_kv_heads"] if shape["n_heads"] and shape["n_kv_heads"] else None,
        "moe": None if not shape["num_experts"] else {
            "num_experts": shape["num_experts"], "top_k": shape["top_k"],
            "density": shape["top_k"] / shape["num_experts"]},
        "attention_entropy": sum(att.layer_entropy) / L,
        "attention_normalized_entropy": sum(att.layer_normalized_entropy) / L,
        "attention_effective_support": sum(att.layer_effective_support) / L,
        "attention_layer_normalized_entropy": att.layer_normalized_entropy,
        "weight_frac_below_1e-3_max": ((frac * sizes).sum() / sizes.sum()).item(),
        "weight_hoyer": ((hoy * sizes).nansum() / sizes[~hoy.isnan()].sum()).item(),
        "weight_per_layer_hoyer": ws.per_layer_hoyer,
    }
    return Diagnosis(
        model=name or getattr(model, "source_path", None) or type(model).__name__, n_layers=L, d_model=d,
        sample=sample, tau=tau, loss_ratios=use.loss_ratios, useful_blocks=[l for l in range(L) if use.useful[l]],
        undecided_blocks=use.undecided,
        angular_distance=ang.angular_distance, jacobian_norm=jn, near_identity=near, out_var=var.out_var,
        growth=growth_fits(var.out_var) if L >= 3 else None, sparsity=sparsity,
        levers=recipe_levers(shape, training_weight_decay(model)), warnings=warnings,
        seconds=time.perf_counter() - start, timings=timings, provenance=provenance(model))


def doctor(model: str | Path, *, num_samples: int = 8, seq_len: int = 128, seed: int = 0, data=None,
           dtype: str = "auto", device: str = "cpu", json_out: str | Path | None = None, progress: bool = False,
           **options) -> Diagnosis:
    """Load `model` (anything `load_model` accepts), diagnose it, and optionally write the diagnosis as JSON."""
    from depthlab.loading import load_model
    from depthlab.precision import resolve_dtype

    net, tokenizer = load_model(model, device=device, dtype=resolve_dtype(dtype, device))
    result = diagnose(net, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed, data=data,
                      name=str(model), progress=progress, **options)
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, dumps_json(result.to_dict(), indent=1) + "\n")
    return result
