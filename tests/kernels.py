"""The CPU kernels in tests: built where a compiler is, so that a build failure fails the run."""

from __future__ import annotations

import pytest

from shard.paged import kernels


def require_kernels(*, optional: bool = False) -> bool:
    """Loads the CPU kernels (shard/paged/kernels.py). Where they do not load: the test fails when this
    machine has a C++ compiler (the build broke), and is skipped when it has none; with ``optional``, a
    machine without a compiler returns False instead, for tests that check the torch path as well."""
    if kernels.load_kernels():
        return True
    if kernels.compiler_available():
        pytest.fail(
            f"the CPU kernels failed to build although a C++ compiler is here: {kernels.build_error()}"
        )
    if optional:
        return False
    pytest.skip("no C++ compiler here: the CPU kernels cannot be built")
