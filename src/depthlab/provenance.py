"""Where a result came from: the one ``provenance`` block every results file depthlab writes carries.

A number is only comparable with another when the reader knows what produced it, so analysis results.json, eval
results.json, doctor.json and prune_report.json (and exported model cards) all record the same fields: when
(``date``, UTC), how (``command``, the process's command line), on what (``device``, ``dtype``), with which code
(``versions``), and from which weights (``model``: the reference given, its format, and how the weights were
obtained — e.g. ``"GGUF Q4_1, dequantised to fp32"`` for the bundled SmolLM2, whose numbers are those of a 4-bit
quantised model, not of the original bf16 release).
"""

from __future__ import annotations

import contextvars
import datetime
import platform
import shlex
import struct
import sys
from pathlib import Path

from depthlab import __version__
from depthlab.precision import dtype_name

PACKAGES = ("torch", "transformers", "numpy", "tokenizers", "safetensors", "gguf", "lm-eval")
"""Libraries whose version can change a result (recorded when installed)."""


def versions() -> dict[str, str]:
    import importlib.metadata  # here: it costs ~0.2 s, and `depthlab --help` imports this module

    out = {"depthlab": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


CLI_ARGV: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("depthlab_cli_argv", default=None)
"""The arguments `depthlab.cli.main` is running with (also when it is called in-process, e.g. from a notebook)."""


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a shell would take it (``depthlab analyze smollm2 ...``)."""
    if argv is None:
        cli = CLI_ARGV.get()
        argv = ["depthlab", *cli] if cli is not None else sys.argv
    argv = list(argv)
    if argv and Path(argv[0]).name in ("__main__.py", "depthlab"):
        argv[0] = "depthlab"
    return " ".join(shlex.quote(a) for a in argv)


def gguf_file_type(path: str | Path) -> str | None:
    """The quantisation a GGUF file declares (``general.file_type``: "Q4_1", "Q8_0", "F16", ...), or None.

    Reads only the header's key/value section up to that key (GGUFReader would parse every tensor entry first).
    """
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    try:
        with open(path, "rb") as f:
            def read(fmt):
                return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

            def skip(kind):
                if kind in scalar:
                    f.seek(struct.calcsize(scalar[kind]), 1)
                elif kind == 8:
                    f.seek(read("Q"), 1)
                elif kind == 9:
                    inner, count = read("I"), read("Q")
                    if inner in scalar:
                        f.seek(count * struct.calcsize(scalar[inner]), 1)
                    else:
                        for _ in range(count):
                            skip(inner)
                else:
                    raise ValueError(kind)

            if f.read(4) != b"GGUF" or read("I") < 2:
                return None
            read("Q")
            for _ in range(read("Q")):
                key = f.read(read("Q")).decode("utf-8", "replace")
                kind = read("I")
                if key == "general.file_type" and kind in scalar:
                    return _file_type_name(read(scalar[kind]))
                skip(kind)
    except (OSError, ValueError, struct.error):
        return None
    return None


def _file_type_name(value: int) -> str:
    try:
        import gguf

        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except (ImportError, ValueError):
        return f"file_type {value}"


def model_origin(model) -> dict:
    """What `model` is and how its weights were obtained (from what `depthlab.load_model` recorded on it)."""
    # Imported here, not at the top: the CLI imports this module without torch.
    from depthlab.model.view import is_native

    ref = getattr(model, "source_path", None)
    dtype = dtype_name(next((p.dtype for p in model.parameters()), None))
    out = {"ref": ref, "class": type(model).__name__, "dtype": dtype}
    if ref and str(ref).endswith(".gguf"):
        quant = gguf_file_type(ref) or "quantised"
        out["format"] = "gguf"
        out["origin"] = f"GGUF {quant}, dequantised to {dtype}"
    elif ref and is_native(model):
        out["format"] = "depthlab"
        out["origin"] = f"depthlab checkpoint, {dtype}"
    elif ref:
        out["format"] = "huggingface"
        out["origin"] = f"Hugging Face weights (safetensors), {dtype}"
    return out


def peak_memory() -> dict:
    """The process's peak resident memory so far (``ru_maxrss``, loading included) and, where CUDA was used, the peak
    of tensor memory allocated on each GPU, in bytes: what a run needed, recorded with its results."""
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    out: dict = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}
    torch = sys.modules.get("torch")  # never imported just for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_bytes"] = {f"cuda:{i}": torch.cuda.max_memory_allocated(i)
                                  for i in range(torch.cuda.device_count())}
    return out


def provenance(model=None, *, device=None, dtype=None, argv: list[str] | None = None) -> dict:
    """The provenance block: date, command, device, dtype, versions and (given a model) the model's origin."""
    if model is not None and device is None:
        device = next((str(p.device) for p in model.parameters()), None)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": command_line(argv), "device": None if device is None else str(device),
           "dtype": None if dtype is None else dtype_name(dtype), "versions": versions()}
    if model is not None:
        out["model"] = model_origin(model)
        if out["dtype"] is None:
            out["dtype"] = out["model"]["dtype"]
    return out
