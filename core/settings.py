"""Fill a config model from defaults, a config file, ``COGEN_*`` environment variables and CLI flags.

Later sources win: defaults < ``--config FILE`` (JSON or TOML, nested like the model) < environment
< flags. Flags and variables are generated from the model's leaf fields, so a field is declared once:
``NodeConfig.model.lora_rank`` becomes ``--lora-rank`` and ``COGEN_LORA_RANK``.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from cogen.core.exit_codes import CommandError, ExitCode

ENV_PREFIX = "COGEN_"
M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError, CommandError):
    """A one-line explanation of bad configuration."""

    exit_code = ExitCode.CONFIG
    what = "bad configuration"


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def leaf_fields(
    cls: type[BaseModel], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Yield ``(path, field)`` for every non-model field of ``cls``, depth first."""
    for name, field in cls.model_fields.items():
        if _is_model(field.annotation):
            yield from leaf_fields(field.annotation, (*path, name))  # type: ignore[arg-type]
        else:
            yield (*path, name), field


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_sequence(annotation: Any) -> bool:
    return typing.get_origin(_unwrap_optional(annotation)) in (tuple, list)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    return ENV_PREFIX + name.upper()


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel]) -> None:
    """Add one flag per leaf field of ``cls``, plus ``--config``."""
    parser.add_argument("--config", type=Path, default=None, help="JSON or TOML file with settings")
    seen: set[str] = set()
    for path, field in leaf_fields(cls):
        name = path[-1]
        if name in seen:
            raise RuntimeError(f"config field name {name!r} is used twice; flags would clash")
        seen.add(name)
        annotation = _unwrap_optional(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = ", ".join(default) if isinstance(default, tuple) else default
        help_text = f"{field.description or ''} (default: {shown}; env {env_of(name)})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_sequence(annotation):
            kwargs["nargs"] = "*"
            kwargs["metavar"] = name.upper().rstrip("S")
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(annotation)
        else:
            kwargs["metavar"] = name.upper()
        parser.add_argument(flag_of(name), **kwargs)


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(
            f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _from_env(path: tuple[str, ...], field: FieldInfo, raw: str) -> Any:
    if _is_sequence(field.annotation):
        return [part for part in raw.replace(",", " ").split() if part]
    annotation: Any = field.annotation
    try:
        return TypeAdapter(annotation).validate_strings(raw)
    except ValidationError as e:
        raise ConfigError(f"{env_of(path[-1])}={raw!r}: {e.errors()[0]['msg']}") from None


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(
    cls: type[M],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> M:
    """Build ``cls`` from (in increasing priority) a config file, the environment, flags and ``overrides``."""
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    config_file = getattr(args, "config", None) if args is not None else None
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    if config_file is not None:
        tree = _merge(tree, _read_file(Path(config_file)))
    for path, field in leaf_fields(cls):
        name = path[-1]
        if env_of(name) in environ:
            _set_path(tree, path, _from_env(path, field, environ[env_of(name)]))
        if args is not None and hasattr(args, name):
            _set_path(tree, path, getattr(args, name))
    paths = {p[-1]: p for p, _ in leaf_fields(cls)}
    for name, value in overrides.items():
        if name not in paths:
            raise ConfigError(f"unknown setting {name!r}")
        _set_path(tree, paths[name], value)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        first = e.errors()[0]
        where = first["loc"][-1] if first["loc"] else "config"
        where_flag = flag_of(str(where)) if str(where) in paths else str(where)
        raise ConfigError(f"{where_flag}: {first['msg']}") from None
