"""The paged runner's CPU kernels: built once per machine, loaded once per process.

``quant_cpu.cpp`` holds the matrix products (``torch.ops.paged_quant``: int8, int4 and the dense decode
product), ``step_cpu.cpp`` the rest of a decode step (``torch.ops.paged_step``: attention over the paged
pool, RMSNorm, rotary embedding); ``simd.h`` is their shared vector code. torch's extension builder
compiles them with ``-march=native`` and caches the library, so only a machine's first start pays for the
build. Without a compiler every caller keeps its torch path.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = (_HERE / "quant_cpu.cpp", _HERE / "step_cpu.cpp")
_lock = threading.Lock()
_loaded: bool | None = None
_int8_vnni = False


def load_kernels() -> bool:
    """Builds (first time on this machine) and loads the CPU kernels; False when that is not possible."""
    global _loaded, _int8_vnni
    with _lock:
        if _loaded is None:
            try:
                from torch.utils.cpp_extension import load

                load(
                    name="paged_cpu_kernels",
                    sources=[str(s) for s in SOURCES],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                    extra_ldflags=["-fopenmp"],
                    extra_include_paths=[str(_HERE)],
                    is_python_module=False,
                )
                _int8_vnni = bool(torch.ops.paged_quant.set_int8_vnni(True))
                _loaded = True
            except Exception as e:  # no compiler, no headers, a read-only cache...
                log.warning("CPU kernels unavailable (%s): the paged runner uses plain torch operations", e)
                _loaded = False
        return _loaded


def kernels_loaded() -> bool:
    """Whether the kernels are loaded in this process (never builds them: for callers outside the paged
    runner, such as the sampler, that use them only when the paged backend already has)."""
    return _loaded is True


def int8_vnni() -> bool:
    """Whether the int8 kernel multiplies int8 by int8 on AVX512-VNNI (after ``load_kernels``)."""
    return _int8_vnni
