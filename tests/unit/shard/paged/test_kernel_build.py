"""Where the CPU kernels are built (keyed by the CPU's instruction sets) and what a failed build does to
the tests (shard/paged/kernels.py, tests/kernels.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shard.paged import kernels
from tests.kernels import require_kernels

AVX2 = (
    "flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c bmi2 hypervisor"
)
AMX = AVX2 + " avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16 constant_tsc"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve"


def test_isa_flags_keep_instruction_sets_only() -> None:
    flags = kernels.isa_flags(f"processor\t: 0\n{AMX}\nbugs\t\t: spectre_v1\n")
    assert {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile", "amx_bf16", "sse4_2"} <= flags
    assert not flags & {"fpu", "tsc", "hypervisor", "constant_tsc", "spectre_v1"}
    assert kernels.isa_flags(ARM) == {"fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32",
                                      "atomics", "sve"}  # fmt: skip
    assert kernels.isa_flags("processor\t: 0\n") == frozenset()


def test_the_key_changes_with_the_instruction_sets_only() -> None:
    avx2, amx = kernels.isa_flags(AVX2), kernels.isa_flags(AMX)
    assert kernels.isa_key(avx2, "x86_64") != kernels.isa_key(amx, "x86_64")
    for other in (avx2 | {"avx512f"}, avx2 - {"fma"}, avx2 | {"avx_vnni"}):
        assert kernels.isa_key(other, "x86_64") != kernels.isa_key(avx2, "x86_64")
    # Order, and flags that are not instruction sets (a VM's, a kernel's), do not matter.
    assert kernels.isa_key(sorted(avx2, reverse=True), "x86_64") == kernels.isa_key(avx2, "x86_64")
    assert kernels.isa_flags(AVX2 + " nopl xtopology") == avx2
    assert kernels.isa_key(avx2, "x86_64") != kernels.isa_key(avx2, "aarch64")


def test_build_directories_differ_by_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    avx2 = kernels.build_directory(kernels.isa_flags(AVX2))
    amx = kernels.build_directory(kernels.isa_flags(AMX))
    assert avx2 != amx and avx2.parent == amx.parent and avx2.parent.parent == tmp_path
    assert avx2.name.startswith(kernels.NAME) and avx2.name.endswith(kernels.isa_key(kernels.isa_flags(AVX2)))
    assert kernels.build_directory() == kernels.build_directory(kernels.isa_flags())


@pytest.fixture
def failing_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh module state whose build fails as a broken source would."""

    def fail() -> None:
        raise RuntimeError("Error building extension 'paged_cpu_kernels'")

    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_error", None)
    monkeypatch.setattr(kernels, "_build", fail)


def test_a_failed_build_with_a_compiler_fails_the_test(
    failing_build: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "compiler_available", lambda: True)
    assert not kernels.load_kernels() and not kernels.kernels_loaded()
    assert kernels.build_error() == "RuntimeError: Error building extension 'paged_cpu_kernels'"
    for optional in (False, True):
        with pytest.raises(pytest.fail.Exception, match=r"failed to build.*Error building extension"):
            require_kernels(optional=optional)


def test_without_a_compiler_the_kernel_tests_skip(
    failing_build: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "compiler_available", lambda: False)
    with pytest.raises(pytest.skip.Exception, match="no C\\+\\+ compiler"):
        require_kernels()
    assert require_kernels(optional=True) is False


def test_compiler_available_follows_cxx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not kernels.compiler_available()
    cxx = tmp_path / "my-c++"
    cxx.write_text("#!/bin/sh\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", f"{cxx} -std=c++17")
    assert kernels.compiler_available()


def test_disabled_kernels_are_never_built_or_loaded(
    failing_build: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--disable-custom-kernels: every caller keeps its torch path, and nothing is compiled (a build here
    would fail, and say so in build_error)."""
    kernels.disable("disabled by --disable-custom-kernels")
    assert not kernels.load_kernels() and not kernels.kernels_loaded()
    assert kernels.build_error() == "disabled by --disable-custom-kernels"
    # Too late once loaded: a caller may already run them.
    monkeypatch.setattr(kernels, "_loaded", True)
    with pytest.raises(RuntimeError, match="loaded already"):
        kernels.disable("late")
