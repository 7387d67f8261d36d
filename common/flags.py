"""Config dataclasses that are also command lines, and travel to child processes as JSON.

Each flag is declared once, as a field of its process's frozen config dataclass (``flag()``: its default,
help and environment variable); ``command()`` makes the Typer command from those fields, and
``to_json``/``from_json`` carry a built config to a child process (the launcher writes one file per child).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

T = TypeVar("T")

# The shards' socket prefix ({prefix}-{rank}): the default of the router's, the shard's and the launcher's.
DEFAULT_UDS_PATH = "/tmp/text-generation-server"


@dataclass(frozen=True)
class Flag:
    """A config field's command-line face."""

    help: str
    # The environment variable that sets it (a command made with ``env=True`` names every flag's after it).
    env: str | None = None
    # The flag's name when it differs from the field's (``--plugin`` for ``plugins``).
    name: str | None = None
    # A one-letter alias (``-p`` for ``--port``), as TGI's launcher has.
    short: str | None = None
    hidden: bool = False
    # A positional argument rather than an option.
    argument: bool = False
    # The type the command line takes, and the function that turns it into the field's value.
    cli_type: Any = None
    parse: Callable[[Any], Any] | None = None
    show_default: bool = True
    # Read from the command line only, never from an environment variable (the test-only switches: an
    # environment left behind must not turn them on in production).
    no_env: bool = False


def flag(default: Any = MISSING, *, help: str, **kwargs: Any) -> Any:
    """A dataclass field that is also a flag (``--field-name``)."""
    meta = {"flag": Flag(help, **kwargs)}
    return field(metadata=meta) if default is MISSING else field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> Flag | None:
    return f.metadata.get("flag")


def default_of(cls: Any, name: str) -> Any:
    """A dataclass field's default: where one config repeats another's, it takes it from there."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise ValueError(f"{cls.__name__}.{name} has no default")


def flag_name(f: dataclasses.Field) -> str:
    meta = flag_of(f)
    return (meta.name if meta is not None and meta.name else f.name).replace("_", "-")


# -- command lines ----------------------------------------------------------------------------------------
def _optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for ``T | None``, else (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return tp, False


def _cli_annotation(tp: Any) -> Any:
    """The type Typer takes for a field's type: tuples become repeatable options."""
    inner, optional = _optional(tp)
    if typing.get_origin(inner) is tuple:
        return types.GenericAlias(list, (typing.get_args(inner)[0],)) | None
    return inner | None if optional else inner


def parameters(cls: type, *, env: bool = False, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """Typer parameters for ``cls``'s flag fields, in field order. A field without a default is optional
    on the command line (None), so that a command can take it from elsewhere (``--config``)."""
    import typer

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = flag_of(f)
        if meta is None or f.name in skip:
            continue
        name = (meta.name or f.name).replace("-", "_")
        annotation = _cli_annotation(meta.cli_type if meta.cli_type is not None else hints[f.name])
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
            annotation = _cli_annotation(annotation | None)
        if isinstance(default, tuple):  # Typer: a repeatable option's default is None
            default = list(default) or None
        if meta.argument:
            info = typer.Argument(help=meta.help, show_default=meta.show_default)
        else:
            envvar = meta.env or (name.upper() if env else None)
            if meta.no_env:
                envvar = None
            decls = (f"--{name.replace('_', '-')}", meta.short) if meta.short else ()
            info = typer.Option(*decls, help=meta.help, envvar=envvar, show_envvar=envvar is not None,
                                hidden=meta.hidden, show_default=meta.show_default)  # fmt: skip
        kind = inspect.Parameter.KEYWORD_ONLY
        out.append(inspect.Parameter(name, kind, default=default, annotation=Annotated[annotation, info]))
    return out


def values_to_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The command line's values (by flag name) as ``cls``'s keyword arguments (parsed, lists as tuples)."""
    out = {}
    for f in dataclasses.fields(cls):
        meta = flag_of(f)
        if meta is None:
            continue
        name = (meta.name or f.name).replace("-", "_")
        if name not in values:
            continue
        value = values[name]
        if meta.parse is not None and value is not None:
            try:
                value = meta.parse(value)
            except ValueError as e:
                import typer

                raise typer.BadParameter(str(e), param_hint=f"--{name.replace('_', '-')}") from None
        if isinstance(value, list):
            value = tuple(value)
        elif value is None and isinstance(f.default, tuple):
            value = f.default
        out[f.name] = value
    return out


def command(
    app: Any,
    run: Callable[..., Any],
    params: list[inspect.Parameter],
    *,
    name: str | None = None,
    doc: str | None = None,
) -> Callable[..., Any]:
    """Registers ``run(**values)`` as a Typer command taking ``params`` (e.g. from ``parameters``)."""

    def cli(**values: Any) -> Any:
        return run(**values)

    cli.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cli.__doc__ = doc or run.__doc__
    cli.__name__ = name or run.__name__
    return app.command(name=name)(cli)


def given_on_command_line(ctx: Any, names: list[str]) -> list[str]:
    """Of ``names`` (parameters of the running command, whose ``typer.Context`` is ``ctx``), those given
    as flags or environment variables rather than left at their defaults."""
    given = []
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.append(name)
    return given


# -- files ------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(typing.cast(Any, value))}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def to_json(config: Any) -> str:
    """A config as JSON, without its secret fields (``metadata={"secret": True}``: they travel in the
    child's environment)."""
    data = {
        f.name: _plain(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if not f.metadata.get("secret")
    }
    return json.dumps(data, indent=1)


def _typed(tp: Any, value: Any, where: str) -> Any:
    inner, optional = _optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"`{where}` must not be null")
    origin = typing.get_origin(inner)
    if origin is tuple:
        item = typing.get_args(inner)[0]
        if not isinstance(value, list):
            raise ValueError(f"`{where}` must be a list")
        return tuple(_typed(item, v, where) for v in value)
    if isinstance(inner, type) and dataclasses.is_dataclass(inner):
        return _from_dict(inner, value, where)
    if inner is Path:
        return Path(value)
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(inner, type) and not isinstance(value, inner):
        raise ValueError(f"`{where}` must be of type {inner.__name__}. Given: {value!r}")
    return value


def _from_dict(cls: type[T], data: Any, where: str = "") -> T:
    if not isinstance(data, dict):
        raise ValueError(f"`{where or cls.__name__}` must be an object")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(typing.cast(Any, cls))
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field `{unknown[0]}`")
    for f in fields:
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{cls.__name__} needs `{f.name}`")
    return cls(**{k: _typed(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()})


def from_json(cls: type[T], text: str, **extra: Any) -> T:
    """A config from ``to_json``'s text; ``extra`` fills the fields a file never holds (secrets)."""
    return _from_dict(cls, {**json.loads(text), **extra})


def write_config(config: Any, path: Path) -> Path:
    """Writes ``config`` to ``path``, readable by this user only."""
    path.touch(mode=0o600)
    path.write_text(to_json(config))
    return path
