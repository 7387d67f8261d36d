"""The dtypes: ``--dtype``'s names, and the one rule that picks the dtype when ``--dtype`` is not given.

The rule (``resolve_dtype``) is what a TGI or vLLM user expects, the model's own dtype where the device runs
it natively:

- CUDA: a float16 checkpoint in float16, anything else in bfloat16 where the GPU supports it, else float16.
- CPU: a 16-bit checkpoint (bfloat16, float16, or a quantized GGUF, whose 4- to 8-bit weights carry
  float16 scales) in bfloat16 where the CPU multiplies bfloat16 natively (AMX, or AVX512-BF16, with
  torch's kernels at AVX-512); float32 everywhere else: float32 checkpoints, checkpoints that do not say,
  AVX2-only CPUs (bfloat16 is emulated there, slower than float32), and other architectures.
- ``--quantize``: int8/int4 keep float32 activations on the CPU (their kernels take float32 rows);
  bitsandbytes computes in float32 on the CPU; ct2 picks its own compute type.

The launcher applies it once, where the flag's default is resolved (it knows a GGUF's own type), logs the
choice with its reason, and hands the shards an explicit dtype; a shard run by hand without ``--dtype``
applies the same rule to its directory's config.json (``default_dtype``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# torch.backends.cpu.get_cpu_capability() values under which torch's own CPU kernels use AVX-512
# (ATEN_CPU_CAPABILITY=avx2 lowers it, and with it this rule's view of the CPU).
AVX512_CAPABILITIES = ("AVX512",)
# GGML tensor types that hold plain floats (anything else in a GGUF is a quantized type).
GGUF_FLOAT_TYPES = {"F32": "float32", "F64": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class Checkpoint:
    """What a model's weights are stored in.

    ``dtype``: the float dtype of the stored weights (float32, float16, bfloat16), None where the checkpoint
    does not say; ``quantized``: the GGUF quantization type (``Q4_1``, ``Q8_0``...) when the served
    directory was dequantized from a quantized GGUF (its own config.json then says float32, which is the
    conversion's dtype, not the model's); ``source``: where this was read, for the log."""

    dtype: str | None
    quantized: str | None = None
    source: str = "config.json"

    def describe(self) -> str:
        if self.quantized:
            return f"a {self.quantized} GGUF ({self.source})"
        if self.dtype is None:
            return f"a checkpoint that does not name its dtype ({self.source})"
        return f"{self.dtype} weights ({self.source})"


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers bfloat16 arithmetic: the flags ``amx_bf16`` and ``avx512_bf16`` (``detect_cpu``:
    /proc/cpuinfo and torch's cpuinfo), and torch's kernel capability
    (``torch.backends.cpu.get_cpu_capability()``: ``AVX512``, ``AVX2``, ``DEFAULT``...)."""

    amx_bf16: bool
    avx512_bf16: bool
    torch_capability: str

    def bf16_unit(self) -> str | None:
        """The unit that multiplies bfloat16 natively here (``AMX``, ``AVX512-BF16``), or None."""
        if self.torch_capability not in AVX512_CAPABILITIES:
            return None
        if self.amx_bf16:
            return "AMX"
        if self.avx512_bf16:
            return "AVX512-BF16"
        return None

    def describe(self) -> str:
        flags = [name for name, on in (("amx_bf16", self.amx_bf16), ("avx512_bf16", self.avx512_bf16)) if on]
        return f"torch CPU capability {self.torch_capability}, flags {', '.join(flags) or 'no amx_bf16/avx512_bf16'}"


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a server runs in and why (logged at start). ``dtype`` None: the backend picks its own
    compute type (``--quantize ct2``)."""

    dtype: str | None
    reason: str


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first processor's flags in /proc/cpuinfo (Linux x86), None where there is no such file."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def _torch_cpu_flags() -> set[str] | None:
    """The CPU features torch's cpuinfo sees (``torch.cpu.get_capabilities``, torch >= 2.10), None before."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return None
    return {name for name, value in capabilities().items() if value is True}


def detect_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """This machine's ``CpuFeatures``. A flag counts where every source that exists reports it: the
    kernel's (/proc/cpuinfo lists what the OS enables) and torch's cpuinfo (which checks the OS saves the
    AVX-512 and AMX state); with neither, no flag."""
    sources = [flags for flags in (_cpuinfo_flags(cpuinfo), _torch_cpu_flags()) if flags is not None]

    def has(flag: str) -> bool:
        return bool(sources) and all(flag in flags for flags in sources)

    return CpuFeatures(
        amx_bf16=has("amx_bf16"),
        avx512_bf16=has("avx512_bf16"),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
    )


def config_checkpoint(model_config: dict, source: str = "config.json") -> Checkpoint:
    """The stored dtype a model's config.json names (``dtype``, or ``torch_dtype`` before transformers
    4.56; a multimodal model's ``text_config`` too)."""
    for config in (model_config, model_config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            value = config.get(key)
            if isinstance(value, str):
                name = value.removeprefix("torch.")
                return Checkpoint(name if name in DTYPES else None, source=f"{source} {key} {value}")
    return Checkpoint(None, source=source)


def dir_checkpoint(model_dir: Path | str) -> Checkpoint:
    """``config_checkpoint`` of a model directory's config.json (no dtype where it has none)."""
    file = Path(model_dir) / "config.json"
    try:
        model_config = json.loads(file.read_text())
    except (OSError, ValueError):
        return Checkpoint(None, source=f"no readable {file}")
    return config_checkpoint(model_config if isinstance(model_config, dict) else {})


def gguf_checkpoint(gguf: Path) -> Checkpoint:
    """A GGUF file's own weights: the type most of its matrices' elements are stored in (GGML types:
    ``F32``, ``F16``, ``BF16`` or a quantized one such as ``Q4_1``)."""
    from gguf import GGUFReader

    elements: dict[str, int] = {}
    for tensor in GGUFReader(gguf).tensors:
        if len(tensor.shape) >= 2:
            name = tensor.tensor_type.name
            elements[name] = elements.get(name, 0) + int(tensor.n_elements)
    if not elements:
        return Checkpoint(None, source=f"{gguf.name}: no matrices")
    kind = max(elements, key=lambda name: elements[name])
    source = f"{gguf.name}, mostly {kind}"
    if kind in GGUF_FLOAT_TYPES:
        return Checkpoint(GGUF_FLOAT_TYPES[kind], source=source)
    return Checkpoint(None, quantized=kind, source=source)


def resolve_dtype(
    device: str,
    checkpoint: Checkpoint,
    quantize: str | None = None,
    cpu: CpuFeatures | None = None,
    cuda_bf16: bool | None = None,
) -> DtypeChoice:
    """The dtype to serve ``checkpoint`` in on ``device`` (``cpu`` or ``cuda``) without ``--dtype``: the
    module's rule. ``cpu``: the CPU's features (default: ``detect_cpu()``); ``cuda_bf16``: whether the GPU
    runs bfloat16 (default: ``torch.cuda.is_bf16_supported()``)."""
    weights = checkpoint.describe()
    if quantize == "ct2":
        return DtypeChoice(None, "--quantize ct2: CTranslate2 picks its own compute type (int8 on CPU)")
    if device == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        if checkpoint.dtype == "float16":
            return DtypeChoice("float16", f"{weights}, on CUDA")
        if cuda_bf16:
            return DtypeChoice("bfloat16", f"{weights}, on a CUDA device that runs bfloat16")
        return DtypeChoice("float16", f"{weights}, on a CUDA device without bfloat16")
    if quantize in ("int8", "int4"):
        return DtypeChoice("float32", f"--quantize {quantize}: its CPU kernels take float32 activations")
    if quantize:
        return DtypeChoice("float32", f"--quantize {quantize} computes in float32 on the CPU")
    if checkpoint.dtype not in ("bfloat16", "float16") and not checkpoint.quantized:
        return DtypeChoice("float32", f"{weights}")
    cpu = cpu or detect_cpu()
    unit = cpu.bf16_unit()
    if unit is None:
        return DtypeChoice(
            "float32",
            f"{weights}, but this CPU has no native bfloat16 products ({cpu.describe()}): float32 is faster "
            "than emulated bfloat16",
        )
    if checkpoint.quantized:
        why = (
            f"{weights}, a 16-bit model: its {checkpoint.quantized} blocks carry float16 scales, and "
            f"bfloat16's rounding of the dequantized weights (2^-9 of a weight at most) is well below the "
            f"{checkpoint.quantized} step"
        )
    elif checkpoint.dtype == "float16":
        why = f"{weights}, served in bfloat16 (the CPU's native 16-bit type, as vLLM does)"
    else:
        why = weights
    return DtypeChoice("bfloat16", f"{why}; this CPU multiplies bfloat16 natively ({unit})")


def default_dtype(
    device: torch.device, model_dir: Path | str | None = None, quantize: str | None = None
) -> torch.dtype:
    """The dtype a backend loads ``model_dir`` in when no ``--dtype`` reached it (a shard run by hand:
    the launcher always passes one): ``resolve_dtype`` on the directory's config.json, logged."""
    checkpoint = dir_checkpoint(model_dir) if model_dir is not None else Checkpoint(None, source="no model")
    choice = resolve_dtype(device.type, checkpoint, quantize)
    log.info("dtype %s (no --dtype): %s", choice.dtype or "float32", choice.reason)
    return DTYPES[choice.dtype or "float32"]
