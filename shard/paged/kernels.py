"""The paged runner's CPU kernels: built once per machine, loaded once per process.

``quant_cpu.cpp`` holds the matrix products (``torch.ops.paged_quant``: int8, int4 and the dense decode
product), ``step_cpu.cpp`` the rest of a decode step (``torch.ops.paged_step``: attention over the paged
pool, RMSNorm, rotary embedding); ``simd.h`` is their shared vector code. torch's extension builder
compiles them with ``-march=native`` and caches the library, so only a machine's first start pays for the
build. The cache directory is keyed by the CPU's instruction sets (``build_directory``): a library built
on a machine with AVX-512 or AMX is never loaded by one without them, where it would die of SIGILL.
Without a compiler every caller keeps its torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = (_HERE / "quant_cpu.cpp", _HERE / "step_cpu.cpp")
NAME = "paged_cpu_kernels"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
# The /proc/cpuinfo flags that name instruction set extensions on x86: -march=native lets the compiler use
# any of them (not only those simd.h tests for: the vectorizer picks AVX-512 or AMX on its own).
_X86_ISA = re.compile(
    r"(sse|ssse|pni|avx|amx|fma|f16c|bmi|abm|popcnt|movbe|adx|aes|pclmulqdq|sha_ni|vaes|vpclmulqdq|gfni"
    r"|cx16|lzcnt|xsave)"
)
_lock = threading.Lock()
_loaded: bool | None = None
_error: str | None = None
_int8_vnni = False


def isa_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's instruction set extensions: /proc/cpuinfo's x86 ``flags`` that name one, or an ARM
    CPU's ``Features`` (all of which do); empty where there is no /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags":
            return frozenset(f for f in value.split() if _X86_ISA.match(f))
        if key == "Features":
            return frozenset(value.split())
    return frozenset()


def isa_key(flags: Iterable[str], machine: str | None = None) -> str:
    """A short digest of the machine architecture and the sorted instruction set flags."""
    text = " ".join([machine or platform.machine(), *sorted(flags)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_directory(flags: Iterable[str] | None = None) -> Path:
    """Where this machine's kernels are built: torch's extension root (``TORCH_EXTENSIONS_DIR`` or its
    default), then the Python, torch and instruction set key, so that one cache may serve several
    machines."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    python = f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}"
    key = isa_key(isa_flags() if flags is None else flags)
    return root / f"{python}_cpu" / f"{NAME}-torch{torch.__version__}-{key}"


def compiler_available() -> bool:
    """Whether a C++ compiler is on this machine (``CXX``, else ``c++`` on the PATH): where one is, the
    kernels are expected to build, and the tests fail when they do not."""
    cxx = os.environ.get("CXX") or "c++"
    return shutil.which(cxx.split()[0]) is not None


def _build() -> None:
    from torch.utils.cpp_extension import load

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    load(
        name=NAME,
        sources=[str(s) for s in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(_HERE)],
        build_directory=str(directory),
        is_python_module=False,
    )


def disable(reason: str) -> None:
    """Keeps this process off the kernels (``--disable-custom-kernels``): ``load_kernels`` returns False
    from now on, and ``build_error`` gives ``reason``. Raises RuntimeError when they are loaded already
    (a caller may have taken their path)."""
    global _loaded, _error
    with _lock:
        if _loaded is True:
            raise RuntimeError("the CPU kernels are loaded already: disable them before the model loads")
        _loaded, _error = False, reason


def load_kernels() -> bool:
    """Builds (first time on this machine) and loads the CPU kernels; False when that is not possible
    (``build_error`` then says why)."""
    global _loaded, _error, _int8_vnni
    with _lock:
        if _loaded is None:
            try:
                _build()
                _int8_vnni = bool(torch.ops.paged_quant.set_int8_vnni(True))
                _loaded = True
            except Exception as e:  # no compiler, no headers, a read-only cache...
                log.warning("CPU kernels unavailable (%s): the paged runner uses plain torch operations", e)
                _error = f"{type(e).__name__}: {e}"
                _loaded = False
        return _loaded


def build_error() -> str | None:
    """Why ``load_kernels`` returned False (None when it did not, or has not run)."""
    return _error


def kernels_loaded() -> bool:
    """Whether the kernels are loaded in this process (never builds them: for callers outside the paged
    runner, such as the sampler, that use them only when the paged backend already has)."""
    return _loaded is True


def int8_vnni() -> bool:
    """Whether the int8 kernel multiplies int8 by int8 on AVX512-VNNI (after ``load_kernels``)."""
    return _int8_vnni
