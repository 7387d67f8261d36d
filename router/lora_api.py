"""vLLM's runtime LoRA routes (issue 21): ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and
``POST /v1/unload_lora_adapter`` ``{"lora_name"}``. They read the server's disk, so they are off unless the
server runs with ``--enable-lora-runtime-updates`` (a 404 naming the flag), and behind the API key as every
route. The shards load or unload between two steps, on every rank (``UpdateLora``); the router then serves
the new set of adapters (``/v1/models``, ``model``, ``adapter_id``)."""

from __future__ import annotations

import grpc
from aiohttp import web

from .body import read_json_object
from .errors import ValidationError
from .openai_api import openai_error, openai_route
from .openai_params import Fields
from .state import get_infer, state


def _enabled(request: web.Request) -> web.Response | None:
    if state(request).config.enable_lora_runtime_updates:
        return None
    return openai_error(
        404, "runtime LoRA updates are off: start the server with --enable-lora-runtime-updates",
        "invalid_request_error", None, "not_found",
    )  # fmt: skip


def _name(fields: Fields) -> str:
    name = fields.raw("lora_name")
    if not isinstance(name, str) or not name:
        raise ValidationError("`lora_name` must be a non-empty string", "lora_name")
    return name


async def _update(request: web.Request, unload: bool) -> web.Response:
    off = _enabled(request)
    if off is not None:
        return off
    infer = get_infer(request)
    fields = Fields(await read_json_object(request))
    name = _name(fields)
    path = ""
    if not unload:
        given = fields.raw("lora_path")
        if not isinstance(given, str) or not given:
            raise ValidationError("`lora_path` must be a non-empty string", "lora_path")
        from common.lora import local_adapters

        try:
            path = local_adapters((f"{name}={given}",))[0].partition("=")[2]
        except ValueError as e:
            raise ValidationError(str(e).replace("`lora_adapters`", "`lora_path`"), "lora_path") from None
        if name in infer.config.model_names:
            raise ValidationError(f"`lora_name` {name!r} is the base model's name", "lora_name")
    fields.finish()
    try:
        names = await infer.client.update_lora(name, path, unload)
    except grpc.aio.AioRpcError as e:
        status = 404 if e.code() == grpc.StatusCode.NOT_FOUND else 400
        return openai_error(status, e.details() or str(e.code()), "invalid_request_error", "lora_name")
    infer.set_adapters(names)
    verb = "removed" if unload else "added"
    return web.Response(text=f"Success: LoRA adapter '{name}' {verb} successfully.")


@openai_route
async def load_lora_adapter(request: web.Request) -> web.Response:
    """POST /v1/load_lora_adapter"""
    return await _update(request, unload=False)


@openai_route
async def unload_lora_adapter(request: web.Request) -> web.Response:
    """POST /v1/unload_lora_adapter"""
    return await _update(request, unload=True)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
