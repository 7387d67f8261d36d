"""``text-generation-benchmark random-model --arch``: the same shape as Mixtral, Qwen2-MoE and Gemma 2, at
the dense Llama's active size, loaded by the paged backend and timed by the step benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.random_model import SHAPES, TOP_K
from benchmark.step_bench import StepConfig, measure

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gemma2"])
def test_an_architecture_at_the_same_active_size(tmp_path: Path, arch: str) -> None:
    import torch

    from shard.backends.paged import PagedBackend

    path = tmp_path / arch
    argv = ["random-model", "--shape", "tiny", "--arch", arch, "--dtype", "float32", "--output", str(path)]
    assert main(argv) == 0
    spec = PagedBackend(path, torch.device("cpu"), kv_cache_bytes=2**20).spec
    shape = SHAPES["tiny"]
    assert (spec.model_type, spec.hidden_size, spec.num_layers) == (arch, shape.hidden, shape.layers)
    moe = spec.layers[0].moe
    if arch == "gemma2":
        assert moe is None and spec.intermediate_size == shape.intermediate and spec.attn_softcap
    else:  # the routed experts' and the shared expert's widths add up to the Llama's
        assert moe is not None and moe.top_k == TOP_K
        assert TOP_K * moe.intermediate_size + moe.shared_intermediate_size == shape.intermediate
    results = measure(StepConfig(str(path), batch_sizes=(2,), prompt_length=9, steps=2, warmups=0))
    assert results[0].tokens_per_s > 0
    assert main(["random-model", "--arch", "gpt2", "--output", str(tmp_path / "x")]) != 0
