"""LoRA adapters on the paged backend (shard/paged/lora.py): three random PEFT adapters on the tiny Llama;
each request's greedy tokens equal PEFT's own model with its adapter (float32), alone and when the three
and the base model share steps (chunked prompts, prefix-cache hits, speculation); bad adapters refused."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from shard.backends.paged import PagedBackend
from shard.chunked import ChunkedEngine
from shard.engines import make_engine
from shard.paged.lora import Adapter, AdapterError, AdapterNotLoaded, LoraStep, Stacks, load_adapter
from shard.types import RequestSpec
from tests.conftest import build_tiny_model
from tests.e2e.harness import free_port
from tests.engine_run import run_engine
from tests.processes import run_ranks

pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")
# name -> (rank, alpha, targets, rsLoRA)
ADAPTERS = {
    "qv": (4, 8, ["q_proj", "v_proj"], False),
    "all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "mlp": (2, 4, ["o_proj", "up_proj", "down_proj"], True),
}
PROMPTS = [
    [5, 6, 7, 8, 9] * 6,  # repeats itself: drafts from the first step under speculation
    list(range(20, 60)),  # longer than a chunk
    [11, 12, 13] * 9 + [40, 41],
]
NEW_TOKENS = 24


def save_adapter(
    base: Path, out: Path, r: int, alpha: int, targets: list[str], rslora: bool, seed: int
) -> Path:
    """A PEFT LoRA adapter with random A and B (PEFT starts B at zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_model(root / "base")
    adapters = {
        name: save_adapter(base, root / name, *config, seed=i + 1)
        for i, (name, config) in enumerate(ADAPTERS.items())
    }
    return base, adapters


def peft_greedy(base: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    """Greedy tokens of PEFT's own model with ``adapter`` (transformers' alone for None), float32."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def expected(lora_model: tuple[Path, dict[str, Path]]) -> dict[tuple[str, int], list[int]]:
    base, adapters = lora_model
    out = {}
    for name in ["", *adapters]:
        for i, prompt in enumerate(PROMPTS):
            out[name, i] = peft_greedy(base, adapters.get(name), prompt)
    return out


def backend(
    lora_model: tuple[Path, dict[str, Path]], cpu_kernels: bool = True, parallel: Any = None
) -> PagedBackend:
    base, adapters = lora_model
    entries = tuple(f"{name}={path}" for name, path in adapters.items())
    return PagedBackend(base, CPU, "float32", parallel, kv_cache_bytes=8 * 2**20, block_size=16,
                        cpu_kernels=cpu_kernels, lora_adapters=entries)  # fmt: skip


def spec(rid: int, adapter: str, prompt: int) -> RequestSpec:
    # ignore_eos: every run gives NEW_TOKENS tokens, as generate's min_new_tokens does.
    return RequestSpec(rid, PROMPTS[prompt], max_new_tokens=NEW_TOKENS, ignore_eos=True, adapter_id=adapter)


def test_the_adapters_change_the_output(expected: dict[tuple[str, int], list[int]]) -> None:
    """The comparison below could fail: each adapter's greedy tokens differ from the base model's."""
    for name in ADAPTERS:
        assert any(expected[name, i] != expected["", i] for i in range(len(PROMPTS))), name


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_each_adapter_alone_equals_peft(lora_model, expected, cpu_kernels: bool) -> None:
    engine = make_engine(backend(lora_model, cpu_kernels), speculate=0)
    for name in ["", *ADAPTERS]:
        for i in range(len(PROMPTS)):
            out = run_engine(engine, {0: [spec(1, name, i)]})
            engine.clear()
            assert out[1] == expected[name, i], (name, i)


@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize("speculate", [0, 4])
def test_three_adapters_and_the_base_in_one_batch_equal_peft(
    lora_model, expected, cpu_kernels: bool, speculate: int
) -> None:
    """Every (adapter, prompt) pair at once, arriving over three steps: the same prompts under four
    adapters run side by side, in chunks (prefill budget 16), each from its own prefix-cache blocks."""
    engine = make_engine(backend(lora_model, cpu_kernels), prefill_tokens=16, speculate=speculate)
    assert isinstance(engine, ChunkedEngine)
    names = ["", *ADAPTERS]
    requests = [spec(k * 10 + i, name, i) for k, name in enumerate(names) for i in range(len(PROMPTS))]
    arrivals = {0: requests[:5], 1: requests[5:9], 3: requests[9:]}
    out = run_engine(engine, arrivals)
    for k, name in enumerate(names):
        for i in range(len(PROMPTS)):
            assert out[k * 10 + i] == expected[name, i], (name, i, speculate)
    if speculate:
        assert engine.drafted > 0


def mixed_run(paged: PagedBackend, speculate: int) -> dict[int, list[int]]:
    """Every (adapter, prompt) pair at once, arriving over three steps, prompts in chunks of 16 tokens."""
    engine = make_engine(paged, prefill_tokens=16, speculate=speculate)
    requests = [spec(k * 10 + i, name, i) for k, name in enumerate(NAMES) for i in range(len(PROMPTS))]
    return run_engine(engine, {0: requests[:5], 1: requests[5:9], 3: requests[9:]})


NAMES = ["", *ADAPTERS]


def _rank(rank: int, port: int, lora_model: tuple[Path, dict[str, Path]], queue: Any) -> None:
    """One of two tensor-parallel ranks on gloo: the mixed run's tokens."""
    from shard.dist import DistInfo, init_parallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        parallel = init_parallel(DistInfo(rank, 2, rank), CPU)
        queue.put((rank, mixed_run(backend(lora_model, parallel=parallel), speculate=0)))
    except BaseException as e:  # reported, not lost in the child's stderr
        queue.put((rank, repr(e)))


def test_two_gloo_ranks_split_the_adapters_like_their_layers(lora_model, expected) -> None:
    """Tensor parallelism: each rank keeps B's rows of its q/k/v heads and gate/up width, A's columns of
    its o and down inputs (x A^T summed over the ranks); the mixed batch's tokens equal PEFT's on both."""
    results = run_ranks(_rank, 2, (free_port(), lora_model), reporting=2, timeout=240)
    want = {k * 10 + i: expected[name, i] for k, name in enumerate(NAMES) for i in range(len(PROMPTS))}
    assert results == {0: want, 1: want}


def test_adapters_never_share_a_prefix(lora_model, expected) -> None:
    """A prompt run under one adapter leaves cached blocks that the same prompt under another adapter (or
    the base model) does not find; the same adapter again does."""
    paged = backend(lora_model)
    engine = make_engine(paged, speculate=0)
    allocator = paged.cache.allocator
    for name, hits in [("qv", 0), ("all", 0), ("", 0), ("qv", 2)]:
        before = allocator.hits
        assert run_engine(engine, {0: [spec(1, name, 1)]})[1] == expected[name, 1]
        engine.clear()
        assert allocator.hits - before == hits, name


def test_an_unknown_adapter_fails_alone(lora_model) -> None:
    engine = make_engine(backend(lora_model), speculate=0)
    failures = engine.add([spec(1, "nope", 0), spec(2, "qv", 0)])
    assert [(f.request_id, f.message) for f in failures] == [
        (1, "`adapter_id` 'nope' is not loaded on this shard")
    ]
    assert backend(lora_model).info.lora_adapters == tuple(ADAPTERS)


def test_segments_gather_rows_of_one_adapter(lora_model) -> None:
    """Rows of one adapter that are not side by side run as one gathered product (an index), contiguous
    ones as a slice; base rows are in no group."""
    paged = backend(lora_model)
    qv, a = paged.adapters["qv"], paged.adapters["all"]
    step = LoraStep.of([(qv, 1), (None, 1), (qv, 3), (a, 2), (None, 4)], CPU)
    assert step is not None
    (g1, rows1), (g2, rows2) = step.groups
    assert g1 is qv and isinstance(rows1, torch.Tensor) and rows1.tolist() == [0, 2, 3, 4]
    assert g2 is a and rows2 == slice(5, 7)
    assert LoraStep.of([(None, 5)], CPU) is None


def test_several_adapters_run_stacked_as_each_alone(lora_model) -> None:
    """With several adapters in a step each fused product runs once over their pairs side by side, each
    row masked to its own adapter: the same deltas as each adapter's own pair on its rows, base rows
    untouched; the stacks are kept while the next step holds the same adapters."""
    paged = backend(lora_model)
    qv, a = paged.adapters["qv"], paged.adapters["all"]
    runs: list[tuple[Adapter | None, int]] = [(qv, 1), (None, 1), (qv, 3), (a, 2), (None, 4)]
    stacks = Stacks()
    stacked = LoraStep.of(runs, CPU, stacks)
    assert stacked is not None and stacked.row_owner is not None
    alone = LoraStep(stacked.groups)  # the per-adapter products
    torch.manual_seed(0)
    for product, pair in a.layers[0].items():
        x = torch.randn(11, pair.a.shape[1])
        base = torch.randn(11, pair.b.shape[0])
        got = stacked.add(0, product, x, base.clone())
        want = alone.add(0, product, x, base.clone())
        torch.testing.assert_close(got, want)
        assert torch.equal(got[[1, 7, 8, 9, 10]], base[[1, 7, 8, 9, 10]])
    again = LoraStep.of(runs, CPU, stacks)
    assert again is not None and again.stacks is stacked.stacks
    assert LoraStep.of([(qv, 2), (None, 1)], CPU, stacks).row_owner is None  # one adapter: its own pair


def rewrite_config(src: Path, dst: Path, **changes: object) -> Path:
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "`use_dora` = True is not supported"),
        ({"modules_to_save": ["lm_head"]}, "`modules_to_save` = ['lm_head'] is not supported"),
        (
            {"target_modules": ["q_proj", "embed_tokens"]},
            "`target_modules` ['embed_tokens'] are not supported",
        ),
        ({"target_modules": ".*proj"}, "(a pattern) is not supported"),
        ({"r": 0}, "`r` must be a positive integer"),
        ({"peft_type": "IA3"}, "`peft_type` 'IA3' is not supported"),
        ({"rank_pattern": {"q_proj": 2}}, "`rank_pattern`"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "`layer_replication` = [[0, 2], [1, 2]] is not supported"),
    ],
)
def test_bad_configs_are_refused_by_name(lora_model, tmp_path: Path, changes: dict, message: str) -> None:
    adapters = lora_model[1]
    bad = rewrite_config(adapters["all"], tmp_path / "bad", **changes)
    with pytest.raises(AdapterError, match="adapter 'bad': ") as e:
        load_adapter("bad", bad, backend(lora_model).spec, torch.float32, CPU)
    assert message in str(e.value)


def test_a_rank_above_max_lora_rank_is_refused(lora_model) -> None:
    base, adapters = lora_model
    paged_spec = backend(lora_model).spec
    assert load_adapter("all", adapters["all"], paged_spec, torch.float32, CPU, max_rank=8).config.r == 8
    with pytest.raises(AdapterError, match=r"adapter 'all': rank `r` = 8 is above --max-lora-rank 4"):
        load_adapter("all", adapters["all"], paged_spec, torch.float32, CPU, max_rank=4)
    entries = (f"all={adapters['all']}",)
    with pytest.raises(AdapterError, match="above --max-lora-rank 4"):
        PagedBackend(base, CPU, "float32", kv_cache_bytes=2**20, lora_adapters=entries, max_lora_rank=4)


def test_bad_files_are_refused_by_name(lora_model, tmp_path: Path) -> None:
    adapters = lora_model[1]
    model_spec = backend(lora_model).spec
    with pytest.raises(AdapterError, match=r"adapter_config\.json not found"):
        load_adapter("x", tmp_path, model_spec, torch.float32, CPU)
    broken = rewrite_config(adapters["qv"], tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter("x", broken, model_spec, torch.float32, CPU)
    # An adapter of another base model (other key/value widths) is refused by its shapes.
    other = build_tiny_model(tmp_path / "other", num_kv_heads=4)
    foreign = save_adapter(other, tmp_path / "foreign", 4, 8, ["k_proj"], False, seed=9)
    with pytest.raises(
        AdapterError, match=r"k_proj\.lora_B\.weight has shape .* \(an adapter of another base model"
    ):
        load_adapter("x", foreign, model_spec, torch.float32, CPU)


def test_the_engine_reports_its_requests_adapters(lora_model) -> None:
    """What vllm:lora_requests_info shows: adapters of running requests (or with their prompt under way)
    and of waiting ones, each once; the base model is no adapter."""
    engine = make_engine(backend(lora_model), prefill_tokens=16, speculate=0)
    engine.add([spec(1, "qv", 1), spec(2, "qv", 0), spec(3, "all", 2), spec(4, "", 0)])
    assert engine.adapters() == ([], ["qv", "all"])
    engine.step()  # 16 prompt tokens: the first request's prompt starts
    assert engine.adapters() == (["qv"], ["qv", "all"])  # the other "qv" request waits
    for _ in range(10):
        engine.step()
    assert engine.adapters() == (["qv", "all"], [])
    engine.clear()
    assert engine.adapters() == ([], [])


def test_adapters_load_and_unload_at_runtime(lora_model, expected) -> None:
    """update_lora (what UpdateLora runs between steps): a new adapter serves at once, with PEFT's tokens;
    one in use is not unloaded; an unloaded one is refused by name; bad loads change nothing."""
    base, adapters = lora_model
    paged = PagedBackend(base, CPU, "float32", kv_cache_bytes=8 * 2**20, block_size=16,
                         lora_adapters=(f"qv={adapters['qv']}",))  # fmt: skip
    engine = make_engine(paged, speculate=0)
    assert isinstance(engine, ChunkedEngine)
    assert engine.update_lora("mlp", str(adapters["mlp"]), unload=False) == ("qv", "mlp")
    assert paged.info.lora_adapters == ("qv", "mlp")
    assert run_engine(engine, {0: [spec(1, "mlp", 2), spec(2, "qv", 2)]}) == {
        1: expected["mlp", 2],
        2: expected["qv", 2],
    }
    engine.clear()
    with pytest.raises(AdapterError, match="adapter 'mlp' is loaded already"):
        engine.update_lora("mlp", str(adapters["mlp"]), unload=False)
    with pytest.raises(AdapterError, match=r"adapter 'bad': .*adapter_config\.json not found"):
        engine.update_lora("bad", str(base), unload=False)
    assert engine.update_lora("all", str(adapters["all"]), unload=False) == ("qv", "mlp", "all")
    assert engine.add([spec(3, "all", 0)]) == []
    with pytest.raises(AdapterError, match=r"adapter 'all' is in use by 1 live request\(s\)"):
        engine.update_lora("all", "", unload=True)
    engine.remove([3])
    assert engine.update_lora("all", "", unload=True) == ("qv", "mlp")
    with pytest.raises(AdapterNotLoaded, match="adapter 'all' is not loaded"):
        engine.update_lora("all", "", unload=True)
    failures = engine.add([spec(4, "all", 0)])
    assert [f.message for f in failures] == ["`adapter_id` 'all' is not loaded on this shard"]


@pytest.mark.parametrize("speculate", [0, 4])
def test_max_loras_one_serves_every_adapter_in_turn(lora_model, expected, speculate: int) -> None:
    """--max-loras 1: three adapters and the base model, all at once; no step holds two adapters, each
    adapter is copied in when its turn comes (the least recently used evicted), and every request still
    gets PEFT's tokens."""
    base, adapters = lora_model
    entries = tuple(f"{name}={path}" for name, path in adapters.items())
    paged = PagedBackend(base, CPU, "float32", kv_cache_bytes=8 * 2**20, block_size=16,
                         lora_adapters=entries, max_loras=1)  # fmt: skip
    assert all(
        p.a.device.type == "cpu"
        for a in paged.adapters.values()
        for layer in a.layers
        for p in layer.values()
    )
    out = mixed_run(paged, speculate)
    want = {k * 10 + i: expected[name, i] for k, name in enumerate(NAMES) for i in range(len(PROMPTS))}
    assert out == want
    stats = paged.stats()
    assert stats["lora_loads"] >= 3 and stats["lora_evictions"] == stats["lora_loads"] - 1
    assert paged.resident is not None and len(paged.resident.on_device) == 1
    with pytest.raises(ValueError, match="a step uses 2 adapters, more than --max-loras 1"):
        paged.resident.use([paged.adapters["qv"], paged.adapters["all"]])


def test_a_backend_without_adapters_refuses_lora_adapters(lora_model) -> None:
    """--lora-adapters with a backend that cannot run them stops the start by name (never ignored)."""
    from shard.backends import load_backend
    from shard.config import ConfigError, ShardConfig

    base, adapters = lora_model
    config = ShardConfig(model_path=base, backend="transformers", lora_adapters=(f"qv={adapters['qv']}",))
    with pytest.raises(ConfigError, match="`--lora-adapters` needs the paged backend \\(transformers runs"):
        load_backend(config, CPU)


def zero_b(adapter: Path, out: Path) -> Path:
    """A copy of ``adapter`` whose B matrices are zero: an adapter that changes nothing."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(".lora_B." in k for k in tensors)
    save_file({k: v.zero_() if ".lora_B." in k else v for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))  # fmt: skip
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_adapters_on_an_int8_or_int4_base(lora_model, tmp_path: Path, mode: str) -> None:
    """QLoRA-style serving (--quantize int8|int4): the base products are the quantized ones, each adapter's
    float delta is added on its rows. An adapter whose B is zero gives exactly the quantized base model's
    tokens (its path adds nothing else), each random adapter changes them, and every request gets the same
    tokens alone as when the adapters and the base model share the steps (chunked, prefix-cache hits)."""
    base, adapters = lora_model
    zero = zero_b(adapters["all"], tmp_path / "zero")
    entries = (*(f"{name}={path}" for name, path in adapters.items()), f"zero={zero}")
    paged = PagedBackend(base, CPU, "float32", kv_cache_bytes=8 * 2**20, block_size=16, quantize=mode,
                         lora_adapters=entries)  # fmt: skip
    assert paged.quantize == mode
    names = ["", *ADAPTERS, "zero"]

    def short(rid: int, adapter: str, prompt: int) -> RequestSpec:
        return RequestSpec(rid, PROMPTS[prompt], max_new_tokens=8, ignore_eos=True, adapter_id=adapter)

    engine = make_engine(paged, speculate=0)
    alone = {}
    for name in names:
        for i in range(len(PROMPTS)):
            alone[name, i] = run_engine(engine, {0: [short(1, name, i)]})[1]
            engine.clear()
    for i in range(len(PROMPTS)):
        assert alone["zero", i] == alone["", i], i
    for name in ADAPTERS:
        assert any(alone[name, i] != alone["", i] for i in range(len(PROMPTS))), name
    requests = [short(k * 10 + i, name, i) for k, name in enumerate(names) for i in range(len(PROMPTS))]
    engine = make_engine(paged, prefill_tokens=16, speculate=0)
    out = run_engine(engine, {0: requests[:6], 1: requests[6:11], 3: requests[11:]})
    for k, name in enumerate(names):
        for i in range(len(PROMPTS)):
            assert out[k * 10 + i] == alone[name, i], (mode, name, i)


def test_evicted_device_copies_are_freed(lora_model) -> None:
    """--max-loras keeps no copy it evicted: after many loads and evictions only `capacity` device copies
    are alive (on a device other than the host's, here `meta`, a load makes new tensors)."""
    import gc
    import weakref

    from shard.paged.lora import Resident

    base, adapters = lora_model
    paged = PagedBackend(base, CPU, "float32", kv_cache_bytes=8 * 2**20, block_size=16, max_loras=2,
                         lora_adapters=tuple(f"{n}={p}" for n, p in adapters.items()))  # fmt: skip
    resident = Resident(2, torch.device("meta"))
    copies: list[weakref.ref] = []
    for turn in range(30):
        step = [paged.adapters[name] for name in list(ADAPTERS)[turn % 3 : turn % 3 + 2]]
        for copy in resident.use(step).values():
            copies.append(weakref.ref(copy.layers[0][next(iter(copy.layers[0]))].a))
    gc.collect()
    assert resident.loads > 20 and resident.evictions == resident.loads - 2
    live = {id(t) for t in (ref() for ref in copies) if t is not None}
    assert len(live) == len(resident.on_device) == 2
