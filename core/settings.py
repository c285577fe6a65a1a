"""Fill a config model from defaults, a config file, ``COGEN_*`` environment variables and CLI flags.

Later sources win: defaults < ``--config FILE`` (JSON or TOML, nested like the model) < environment
< flags. Flags and variables are generated from the model's leaf fields, so a field is declared once:
``NodeConfig.model.lora_rank`` becomes ``--lora-rank`` and ``COGEN_LORA_RANK``.

A nested model's leaves are named by their own field name, so leaf names must be unique across a
config. A nested model used under two configs with different flags carries a prefix where it is nested:
``merge: Annotated[MergeOptions, FlagPrefix("merge")]`` turns ``MergeOptions.method`` into
``--merge-method`` / ``COGEN_MERGE_METHOD`` there, while a config that nests it without a prefix gives
``--method``. Prefixes of nested models compose (outer first). Config files always use the nested
keys (``[merge]`` ``method = "ties"``); an unknown key, at any depth, is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from cogen.core.atomic import write_json_atomic
from cogen.core.exit_codes import CommandError, ExitCode

ENV_PREFIX = "COGEN_"
M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError, CommandError):
    """A one-line explanation of bad configuration."""

    exit_code = ExitCode.CONFIG
    what = "bad configuration"


@dataclass(frozen=True)
class FlagPrefix:
    """``Annotated`` metadata on a nested model field: its leaves' flags and variables start with
    ``prefix`` (``FlagPrefix("merge")``: ``method`` -> ``--merge-method``, ``COGEN_MERGE_METHOD``)."""

    prefix: str


@dataclass(frozen=True)
class Setting:
    """One leaf field of a config: where it sits in the model, and the name of its flag and variable."""

    path: tuple[str, ...]  #: attribute path from the config's root, e.g. ``("merge", "method")``
    name: str  #: flag stem, e.g. ``merge_method`` -> ``--merge-method``, ``COGEN_MERGE_METHOD``
    field: FieldInfo


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _prefix_of(field: FieldInfo) -> str:
    prefixes = [m.prefix for m in field.metadata if isinstance(m, FlagPrefix)]
    return prefixes[0] + "_" if prefixes else ""


def settings_of(cls: type[BaseModel], path: tuple[str, ...] = (), prefix: str = "") -> Iterator[Setting]:
    """Every leaf field of ``cls``, depth first, with its flag name (see the module docstring)."""
    for name, field in cls.model_fields.items():
        if _is_model(field.annotation):
            inner: type[BaseModel] = field.annotation  # type: ignore[assignment]
            yield from settings_of(inner, (*path, name), prefix + _prefix_of(field))
        else:
            yield Setting((*path, name), prefix + name, field)


def leaf_fields(
    cls: type[BaseModel], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Yield ``(path, field)`` for every non-model field of ``cls``, depth first."""
    for setting in settings_of(cls, path):
        yield setting.path, setting.field


def _unique_settings(cls: type[BaseModel]) -> list[Setting]:
    settings, seen = list(settings_of(cls)), set()
    for s in settings:
        if s.name in seen:
            raise RuntimeError(
                f"config setting {s.name!r} of {cls.__name__} is declared twice; flags would clash"
            )
        seen.add(s.name)
    return settings


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
    for setting in _unique_settings(cls):
        name, field = setting.name, setting.field
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
    for depth, part in enumerate(path[:-1]):
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(
                f"{'.'.join(path[: depth + 1])}: a config file must give a table of settings here"
            )
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


def _from_env(setting: Setting, raw: str) -> Any:
    if _is_sequence(setting.field.annotation):
        return [part for part in raw.replace(",", " ").split() if part]
    annotation: Any = setting.field.annotation
    try:
        return TypeAdapter(annotation).validate_strings(raw)
    except ValidationError as e:
        raise ConfigError(f"{env_of(setting.name)}={raw!r}: {e.errors()[0]['msg']}") from None


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _explain(error: ValidationError, settings: list[Setting]) -> ConfigError:
    """The first validation error as one line, named by its flag where it has one."""
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    by_path = {s.path: s.name for s in settings}
    if first["type"] == "extra_forbidden":
        hint = next((s for s in settings if s.name == loc[-1] and s.path != loc), None)
        where = (
            f" (it is [{'.'.join(hint.path[:-1])}] {hint.path[-1]})" if hint and len(hint.path) > 1 else ""
        )
        return ConfigError(f"unknown setting {'.'.join(loc)!r}{where}")
    # a model-level check reports at the nested model: name its path; a leaf check: its flag
    where = flag_of(by_path[loc]) if loc in by_path else ".".join(loc) or "config"
    return ConfigError(f"{where}: {first['msg']}")


def build_config(
    cls: type[M],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> M:
    """Build ``cls`` from (in increasing priority) a config file, the environment, flags and ``overrides``
    (keyed by flag name: ``observer=True``, ``merge_method="ties"``)."""
    environ = os.environ if environ is None else environ
    settings = _unique_settings(cls)
    tree: dict[str, Any] = {}
    config_file = getattr(args, "config", None) if args is not None else None
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    if config_file is not None:
        tree = _merge(tree, _read_file(Path(config_file)))
    for setting in settings:
        if env_of(setting.name) in environ:
            _set_path(tree, setting.path, _from_env(setting, environ[env_of(setting.name)]))
        if args is not None and hasattr(args, setting.name):
            _set_path(tree, setting.path, getattr(args, setting.name))
    paths = {s.name: s.path for s in settings}
    for name, value in overrides.items():
        if name not in paths:
            raise ConfigError(f"unknown setting {name!r}")
        _set_path(tree, paths[name], value)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, settings) from None


def write_config(path: Path, cfg: BaseModel) -> Path:
    """Write ``cfg`` as a nested JSON config file (only what differs from the defaults), atomically:
    what a child process reads back with ``--config path``."""
    write_json_atomic(path, cfg.model_dump(mode="json", exclude_defaults=True))
    return path
