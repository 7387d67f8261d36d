"""bitsandbytes on the transformers backend (--quantize bitsandbytes[-nf4|-fp4]) on a tiny random Llama: the
weights are quantized at load, and the unchanged engine batches it like full precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from shard.backends import load_backend
from shard.backends.hf import HFBackend
from shard.config import ShardConfig
from shard.engines import make_engine
from shard.types import RequestSpec

pytestmark = pytest.mark.timeout(180)
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("mode", "layer"),
    [
        ("bitsandbytes", "Linear8bitLt"),
        ("bitsandbytes-nf4", "Linear4bit"),
        ("bitsandbytes-fp4", "Linear4bit"),
    ],
)
def test_quantized_at_load_and_batched_by_the_engine(mode: str, layer: str, tiny_model_dir: Path) -> None:
    backend = load_backend(ShardConfig(model_path=tiny_model_dir, quantize=mode), CPU)
    assert isinstance(backend, HFBackend) and backend.info.name == f"transformers+{mode}"
    assert backend.info.dtype == "float32" and backend.info.unsupported_parameters == ()
    assert type(backend.model.model.layers[0].mlp.down_proj).__name__ == layer
    full = HFBackend(tiny_model_dir, CPU)
    assert backend.model.get_memory_footprint() < full.model.get_memory_footprint()
    engine = make_engine(backend)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    assert engine.add([RequestSpec(i, p, max_new_tokens=4) for i, p in enumerate(prompts[:2])]) == []
    assert sorted(engine.step().request_ids) == [0, 1]
    assert engine.add([RequestSpec(2, prompts[2], max_new_tokens=4)]) == []  # joins the running batch
    result = engine.step()  # its prompt, then one decode over the merged batch
    assert sorted(set(result.request_ids)) == [0, 1, 2] and not result.failures
    assert engine.batch is not None and sorted(engine.batch.request_ids) == [0, 1, 2]
    engine.remove([1])  # request 1 leaves
    result = engine.step()
    assert sorted(result.request_ids) == [0, 2]
    engine.clear()


def test_bitsandbytes_refuses_the_paged_backend(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="transformers backend"):
        load_backend(ShardConfig(model_path=tiny_model_dir, quantize="bitsandbytes", backend="paged"), CPU)
