"""``text-generation-launcher``: TGI v0.9.4's flags (each also read from its UPPER_SNAKE env var), made from
LauncherConfig's fields (launcher/config.py)."""

from __future__ import annotations

import inspect
import logging
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from common.flags import command, parameters, values_to_fields
from common.logs import setup_logging

from .config import ArgumentError, LauncherConfig

if TYPE_CHECKING:
    from shard.dtypes import Checkpoint

    from .weights import ResolvedModel

log = logging.getLogger("launcher")

app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)


def read_model_config(path: Path) -> dict:
    """The model directory's config.json ({} when there is none, e.g. a converted CTranslate2 model)."""
    import json

    file = Path(path) / "config.json"
    return json.loads(file.read_text()) if file.exists() else {}


def model_checkpoint(model: ResolvedModel) -> Checkpoint:
    """What the served weights are stored in: the GGUF's own type for a dequantized GGUF (its directory says
    float32, the conversion's dtype), else what the directory's config.json names."""
    from shard.dtypes import dir_checkpoint, gguf_checkpoint

    return gguf_checkpoint(model.gguf) if model.gguf is not None else dir_checkpoint(model.path)


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def print_plugins(enabled: tuple[str, ...]) -> None:
    """--list-plugins: every installed plugin, whether it loads, and whether it runs."""
    from common.plugins import PluginError, discover

    rows = [("GROUP", "NAME", "PACKAGE", "STATUS")]
    for p in discover():
        try:
            p.load()
            status = "built-in" if p.builtin else ("enabled" if p.name in enabled else "optional (--plugin)")
        except PluginError as e:
            status = f"broken: {e.__cause__ or e}"
        rows.append((p.group, p.name, f"{p.distribution} {p.version}", status))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]))


def nvidia_smi() -> str:
    """``nvidia-smi``'s report, as TGI's --env prints it ("N/A" where there is none)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return "N/A"
    try:
        done = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"N/A ({e})"
    return done.stdout.strip() or f"N/A (exit {done.returncode})"


def print_env() -> None:
    """TGI's --env (-e): what this launcher runs on, printed before it starts."""
    import importlib.metadata

    import torch

    cuda = torch.cuda.is_available()
    try:
        version = importlib.metadata.version("text-generation-server")
    except importlib.metadata.PackageNotFoundError:
        version = "N/A (not installed)"
    rows = {
        "Server version": version,
        "Python": sys.version.split()[0],
        "Platform": platform.platform(),
        "Torch": torch.__version__,
        "CUDA available": cuda,
        "CUDA version": torch.version.cuda or "N/A",
        "GPUs": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "CPU cores": os.cpu_count(),
        "Docker label": os.environ.get("DOCKER_LABEL", "N/A"),
        "nvidia-smi": nvidia_smi(),
    }
    print("Runtime environment:")
    for key, value in rows.items():
        print(f"{key + ':':16} {value}")


LIST_PLUGINS = inspect.Parameter(
    "list_plugins", inspect.Parameter.KEYWORD_ONLY, default=False,
    annotation=Annotated[bool, typer.Option(envvar="LIST_PLUGINS", show_envvar=True,
                                            help="Print the installed plugins and exit.")],
)  # fmt: skip


def launch(list_plugins: bool, **values: object) -> None:
    """Serve a causal language model: TGI's native API and the OpenAI API over continuous batching."""
    config = LauncherConfig(**values_to_fields(LauncherConfig, values))
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"), config.json_output)
    if list_plugins:
        print_plugins(config.plugins)
        raise typer.Exit(0)
    if config.env:
        print_env()
    try:
        config.validate()
    except ArgumentError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    from common.plugins import PluginError, check_enabled

    try:
        for enabled in check_enabled(config.plugins):
            if enabled.group == "logits_processors" and config.quantize == "ct2":
                raise PluginError(
                    f"--plugin {enabled.name}: a logits processor cannot run on --quantize ct2 "
                    "(CTranslate2 samples inside its own decoding loop)"
                )
            log.info("Plugin %s (%s, from %s %s) enabled", enabled.name, enabled.group, enabled.distribution,
                     enabled.version)  # fmt: skip
    except PluginError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    if config.ngrok_authtoken or config.ngrok_edge:
        log.warning("--ngrok-authtoken and --ngrok-edge have no effect without --ngrok, as in TGI")
    if config.trust_remote_code:
        log.warning("`--trust-remote-code` is set: the model's own code from the hub will run")

    from .weights import WeightsConfig, WeightsError, ct2_converted, hub_cache_dir, resolve

    try:
        weights_config = WeightsConfig(
            model_id=config.model_id,
            revision=config.revision,
            hub_cache=config.huggingface_hub_cache,
            weights_cache_override=config.weights_cache_override,
            token=os.environ.get("HUGGING_FACE_HUB_TOKEN") or os.environ.get("HF_TOKEN"),
            offline=os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"),
            trust_remote_code=config.trust_remote_code,
        )
        model = resolve(weights_config)
        if config.quantize == "ct2":  # converted once into the weights cache, loaded directly after
            from common.quantize import ct2_compute_type, ct2_device

            compute_type = ct2_compute_type(config.dtype, ct2_device())
            model = ct2_converted(model, hub_cache_dir(weights_config), compute_type)
    except WeightsError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    log.info("Serving %s (%s) from %s", model.model_id, model.weights, model.path)
    cuda_devices = cuda_device_count()
    try:
        fitted = config.check_model(read_model_config(model.path), cuda_devices)
    except ArgumentError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        fitted, dtype = fitted.fit_dtype(model_checkpoint(model), cuda_devices)
    except (OSError, ValueError) as e:
        typer.echo(f"Error: cannot read the dtype of {model.gguf or model.path}: {e}", err=True)
        raise typer.Exit(1) from None
    log.info("dtype %s: %s", dtype.dtype or "the backend's own", dtype.reason)
    if (fitted.max_input_length, fitted.max_total_tokens) != (config.input_length(), config.total_tokens()):
        log.info(
            "The model has fewer positions than the default token limits: --max-input-length %d, "
            "--max-total-tokens %d", fitted.max_input_length, fitted.max_total_tokens,
        )  # fmt: skip
    config = fitted

    from .supervisor import Supervisor

    raise typer.Exit(Supervisor(config, model).run())


command(app, launch, [*parameters(LauncherConfig, env=True), LIST_PLUGINS], name="launch")


def main() -> None:
    app()
