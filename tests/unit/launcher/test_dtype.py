"""--dtype's default (shard/dtypes.py's rule, applied by LauncherConfig.fit_dtype): the checkpoint's own dtype
where the device runs it natively, float32 elsewhere on the CPU; the CPU's features injected, both ways."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.config import LauncherConfig
from shard.dtypes import (
    Checkpoint,
    CpuFeatures,
    config_checkpoint,
    default_dtype,
    detect_cpu,
    dir_checkpoint,
    gguf_checkpoint,
    resolve_dtype,
)

AMX = CpuFeatures(amx_bf16=True, avx512_bf16=True, torch_capability="AVX512")
AVX512_BF16 = CpuFeatures(amx_bf16=False, avx512_bf16=True, torch_capability="AVX512")  # this project's EPYC
AVX512_ONLY = CpuFeatures(amx_bf16=False, avx512_bf16=False, torch_capability="AVX512")
AVX2 = CpuFeatures(amx_bf16=False, avx512_bf16=False, torch_capability="AVX2")
# A bfloat16 CPU whose torch kernels are held at AVX2 (ATEN_CPU_CAPABILITY=avx2).
HELD_AT_AVX2 = CpuFeatures(amx_bf16=False, avx512_bf16=True, torch_capability="AVX2")

BF16 = Checkpoint("bfloat16")
FP16 = Checkpoint("float16")
FP32 = Checkpoint("float32")
Q4_1 = Checkpoint(None, quantized="Q4_1", source="SmolLM2-135M-Instruct.Q4_1.gguf, mostly Q4_1")


@pytest.mark.parametrize(("cpu", "unit"), [(AMX, "AMX"), (AVX512_BF16, "AVX512-BF16")])
@pytest.mark.parametrize("checkpoint", [BF16, FP16, Q4_1])
def test_sixteen_bit_weights_run_in_bfloat16_where_the_cpu_multiplies_it(
    cpu: CpuFeatures, unit: str, checkpoint: Checkpoint
) -> None:
    choice = resolve_dtype("cpu", checkpoint, cpu=cpu)
    assert choice.dtype == "bfloat16"
    assert choice.reason.endswith(f"this CPU multiplies bfloat16 natively ({unit})")
    assert checkpoint.describe() in choice.reason


@pytest.mark.parametrize("cpu", [AVX2, AVX512_ONLY, HELD_AT_AVX2])
@pytest.mark.parametrize("checkpoint", [BF16, FP16, Q4_1])
def test_without_native_bfloat16_products_the_cpu_runs_float32(
    cpu: CpuFeatures, checkpoint: Checkpoint
) -> None:
    choice = resolve_dtype("cpu", checkpoint, cpu=cpu)
    assert choice.dtype == "float32"
    assert "this CPU has no native bfloat16 products" in choice.reason
    assert f"torch CPU capability {cpu.torch_capability}" in choice.reason


@pytest.mark.parametrize("checkpoint", [FP32, Checkpoint(None)])
def test_float32_and_unnamed_checkpoints_stay_float32_even_with_amx(checkpoint: Checkpoint) -> None:
    choice = resolve_dtype("cpu", checkpoint, cpu=AMX)
    assert choice.dtype == "float32" and choice.reason == checkpoint.describe()


def test_quantized_modes_keep_their_own_compute_dtype_on_the_cpu() -> None:
    for mode in ("int8", "int4"):
        assert resolve_dtype("cpu", BF16, mode, cpu=AMX).dtype == "float32"
    assert resolve_dtype("cpu", BF16, "bitsandbytes-nf4", cpu=AMX).dtype == "float32"
    ct2 = resolve_dtype("cpu", BF16, "ct2", cpu=AMX)
    assert ct2.dtype is None and "CTranslate2" in ct2.reason


def test_cuda_follows_the_checkpoint_in_sixteen_bits() -> None:
    assert resolve_dtype("cuda", FP16, cuda_bf16=True).dtype == "float16"
    assert resolve_dtype("cuda", BF16, cuda_bf16=True).dtype == "bfloat16"
    assert resolve_dtype("cuda", FP32, cuda_bf16=True).dtype == "bfloat16"
    assert resolve_dtype("cuda", Q4_1, cuda_bf16=True).dtype == "bfloat16"
    assert resolve_dtype("cuda", BF16, cuda_bf16=False).dtype == "float16"
    assert resolve_dtype("cuda", FP32, cuda_bf16=False).dtype == "float16"


def test_config_json_names_the_dtype_by_either_key() -> None:
    assert config_checkpoint({"dtype": "bfloat16"}).dtype == "bfloat16"
    assert config_checkpoint({"torch_dtype": "float16"}).dtype == "float16"
    assert config_checkpoint({"torch_dtype": "torch.bfloat16"}).dtype == "bfloat16"
    assert config_checkpoint({"text_config": {"dtype": "bfloat16"}}).dtype == "bfloat16"
    assert config_checkpoint({"dtype": "float64"}).dtype is None
    unnamed = config_checkpoint({"model_type": "llama"})
    assert unnamed.dtype is None and "does not name its dtype" in unnamed.describe()


def test_a_directory_without_a_readable_config_names_no_dtype(tmp_path: Path) -> None:
    assert dir_checkpoint(tmp_path).dtype is None
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert dir_checkpoint(tmp_path) == Checkpoint("bfloat16", source="config.json dtype bfloat16")


def write_gguf(path: Path, kind: str) -> Path:
    """A GGUF file with two matrices stored as ``kind`` (F32, BF16 or Q4_1) and a float32 norm vector."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    rows = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_up.weight"):
        if kind == "F32":
            writer.add_tensor(name, rows)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(rows, qtype), raw_dtype=qtype)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("kind", "dtype", "quantized"),
    [("F32", "float32", None), ("BF16", "bfloat16", None), ("Q4_1", None, "Q4_1")],
)
def test_a_gguf_is_its_matrices_own_type(
    tmp_path: Path, kind: str, dtype: str | None, quantized: str | None
) -> None:
    checkpoint = gguf_checkpoint(write_gguf(tmp_path / f"m.{kind}.gguf", kind))
    assert (checkpoint.dtype, checkpoint.quantized) == (dtype, quantized)
    assert checkpoint.source == f"m.{kind}.gguf, mostly {kind}"


def test_the_default_model_is_a_q4_1_gguf() -> None:
    """SmolLM2-135M-Instruct ships as a Q4_1 GGUF: a 16-bit model for the rule, so bfloat16 where native."""
    from launcher.weights import find_default_gguf

    checkpoint = gguf_checkpoint(find_default_gguf()[0])
    assert checkpoint.quantized == "Q4_1" and checkpoint.dtype is None
    assert resolve_dtype("cpu", checkpoint, cpu=AVX512_BF16).dtype == "bfloat16"
    assert resolve_dtype("cpu", checkpoint, cpu=AVX2).dtype == "float32"


def test_this_machines_features_agree_with_its_cpuinfo(tmp_path: Path) -> None:
    cpu = detect_cpu()
    assert cpu.torch_capability == torch.backends.cpu.get_cpu_capability()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])  # fmt: skip
        assert cpu.avx512_bf16 <= ("avx512_bf16" in flags) and cpu.amx_bf16 <= ("amx_bf16" in flags)
    # A flag the kernel does not list does not count, whatever the CPU's own identification says.
    bare = tmp_path / "cpuinfo"
    bare.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not detect_cpu(bare).avx512_bf16 and not detect_cpu(bare).amx_bf16


def test_the_launcher_resolves_the_default_once_and_hands_it_to_every_shard() -> None:
    from launcher.supervisor import Supervisor
    from launcher.weights import ResolvedModel

    model = ResolvedModel("m", Path("/m"), None, None, "local", "m.safetensors")
    fitted, choice = LauncherConfig(num_shard=2).fit_dtype(BF16, 0, AVX512_BF16)
    assert fitted.dtype == choice.dtype == "bfloat16"
    assert {Supervisor(fitted, model).shard_config(rank).dtype for rank in (0, 1)} == {"bfloat16"}
    assert LauncherConfig().fit_dtype(BF16, 0, AVX2)[0].dtype == "float32"
    given, why = LauncherConfig(dtype="float32").fit_dtype(BF16, 0, AMX)
    assert given.dtype == "float32" and why.reason == "--dtype"
    ct2, _ = LauncherConfig(quantize="ct2").fit_dtype(BF16, 0, AMX)
    assert ct2.dtype is None  # CTranslate2's own compute type


def test_a_shard_run_by_hand_applies_the_same_rule(tmp_path: Path) -> None:
    """Without --dtype (no launcher), a backend reads its directory's config.json."""
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert default_dtype(torch.device("cpu"), tmp_path) == torch.float32
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    native = detect_cpu().bf16_unit() is not None
    assert default_dtype(torch.device("cpu"), tmp_path) == (torch.bfloat16 if native else torch.float32)
    assert default_dtype(torch.device("cpu"), tmp_path, "int4") == torch.float32
