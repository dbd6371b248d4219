"""Stage configuration: dataclass defaults < a params.yaml section < command-line flags.

Each stage declares one frozen dataclass whose fields are made with `setting()`; the help
text there is the single description of the option, reused by `--help`, and so are its
limits (choices, a lower bound, a number of items), which `--help` shows and every config
is checked against before any work (check_declared). Unknown keys in params.yaml are
errors that list the valid keys, and flags are parsed strictly (a bool flag accepts
true/false, not any string).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import UserError

Config = TypeVar("Config")

_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] = (),
    at_least: float | None = None,
    count: int | None = None,
) -> Any:
    """A config field with its help text and limits; tuples are the only sequence type.

    Args:
        default: the value when neither params.yaml nor a flag gives one.
        help: the option's one description, shown by --help.
        choices: the allowed values (of each item, for a tuple); empty: any.
        at_least: the smallest allowed value (of each item, for a tuple); None: any.
        count: how many items a tuple must have; None: any number.
    """
    limits = {"choices": choices, "at_least": at_least, "count": count}
    return dataclasses.field(default=default, metadata={"help": help, **limits})


def _limits_text(field: dataclasses.Field) -> str:
    limits = field.metadata
    parts = []
    if limits.get("choices"):
        parts.append("one of " + ", ".join(map(str, limits["choices"])))
    if limits.get("at_least") is not None:
        parts.append(f"at least {limits['at_least']:g}")
    if limits.get("count") is not None:
        parts.append(f"exactly {limits['count']} values")
    return "; ".join(parts)


def check_declared(config: Any) -> None:
    """Check every field of `config` against the limits its `setting()` declares.

    Raises:
        UserError: naming the first value out of its limits, and the limits.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        items = value if isinstance(value, tuple) else (value,)
        count = field.metadata.get("count")
        choices = field.metadata.get("choices") or ()
        at_least = field.metadata.get("at_least")
        wrong = (
            (count is not None and len(items) != count)
            or (choices and any(item not in choices for item in items))
            or (at_least is not None and any(item < at_least for item in items))
        )
        if wrong:
            shown = " ".join(map(str, items)) if isinstance(value, tuple) else repr(value)
            raise UserError(
                f"{_flag_name(field.name)} is {shown}; it must be {_limits_text(field)}"
            )


def parse_bool(text: str) -> bool:
    """Parse a boolean flag strictly."""
    word = str(text).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_types(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def _element_type(tuple_type: Any) -> type:
    return typing.get_args(tuple_type)[0]


def _is_tuple(field_type: Any) -> bool:
    return typing.get_origin(field_type) is tuple


def _flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, section: str) -> None:
    """Add `--params`, `--section` and one flag per config field to `parser`.

    Flags default to None so that only what the user typed overrides params.yaml.
    """
    parser.add_argument(
        "--params",
        metavar="YAML",
        help="params.yaml with one section per stage; its values override the defaults "
        "below and flags override it",
    )
    parser.add_argument(
        "--section",
        default=section,
        help="which section of --params to read; a dotted name such as extract.images is "
        f"one section of a group (default: {section})",
    )
    types_by_name = _field_types(config_cls)
    for field in dataclasses.fields(config_cls):
        field_type = types_by_name[field.name]
        limits = _limits_text(field)
        help_text = (
            f"{field.metadata.get('help', '')} ({limits + '; ' if limits else ''}"
            f"default: {_show(field.default)})"
        ).replace("%", "%%")  # argparse reads help as a %-format string
        if _is_tuple(field_type):
            parser.add_argument(
                _flag_name(field.name),
                nargs="+",
                type=_element_type(field_type),
                help=help_text,
                metavar=field.name.upper(),
            )
        elif field_type is bool:
            parser.add_argument(
                _flag_name(field.name), type=parse_bool, metavar="{true,false}", help=help_text
            )
        else:
            parser.add_argument(
                _flag_name(field.name), type=field_type, help=help_text, metavar=field.name.upper()
            )


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(str(item) for item in value) or "none"
    if value == "":
        return "required"
    return str(value)


def read_params_section(params_path: str | Path, section: str) -> dict[str, Any]:
    """Read one section of a params.yaml file: `fuse`, or a dotted name such as
    `extract.images` for params["extract"]["images"] (a group of sections).

    Raises:
        UserError: a missing file, or a missing section or group: one line listing the
            sections present (a group's as dotted names).
    """
    path = Path(params_path)
    if not path.is_file():
        raise UserError(f"params file {path} does not exist")
    with path.open(encoding="utf-8") as handle:
        params = yaml.safe_load(handle) or {}
    found = _find_section(params, section)
    if found is None:
        raise UserError(
            f"{path} has no section '{section}'; sections present: "
            f"{', '.join(section_names(params))}"
        )
    if _is_group(found):
        inside = ", ".join(f"{section}.{name}" for name in section_names(found))
        raise UserError(f"{path}: '{section}' is a group of sections; pass one of {inside}")
    return dict(found or {})


def _find_section(params: Any, section: str) -> Any:
    """The value at `section` (an exact top-level key first, then a dotted path); None if
    there is none or it is not a mapping (a blank section is an empty one)."""
    if isinstance(params, Mapping) and section in params:
        value = params[section]
        return {} if value is None else value if isinstance(value, Mapping) else None
    head, dot, rest = section.partition(".")
    if not dot or not isinstance(params, Mapping) or not isinstance(params.get(head), Mapping):
        return None
    return _find_section(params[head], rest)


def _is_group(value: Any) -> bool:
    """A mapping of sections: not empty, and every value a mapping (a stage's own section
    holds settings, never only mappings)."""
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(item, Mapping) for item in value.values())
    )


def section_names(params: Mapping[str, Any]) -> list[str]:
    """Every section of parsed params, sorted; a group's sections as dotted names."""
    names = []
    for name, value in params.items():
        if _is_group(value):
            names.extend(f"{name}.{inner}" for inner in section_names(value))
        else:
            names.append(str(name))
    return sorted(names)


def build_config(config_cls: type[Config], values: Mapping[str, Any], origin: str) -> Config:
    """Make a config from defaults updated by `values`, checking keys and types.

    Args:
        config_cls: the stage's frozen dataclass.
        values: overrides keyed by field name.
        origin: where the values came from, for error messages.

    Raises:
        UserError: an unknown key, a value of the wrong type or outside its declared limits.
    """
    types_by_name = _field_types(config_cls)
    unknown = sorted(set(values) - set(types_by_name))
    if unknown:
        raise UserError(
            f"{origin}: unknown key(s) {', '.join(unknown)}; "
            f"valid keys are {', '.join(sorted(types_by_name))}"
        )
    coerced = {
        name: _coerce(value, types_by_name[name], f"{origin}: {name}")
        for name, value in values.items()
    }
    config = config_cls(**coerced)
    check_declared(config)
    return config


def _coerce(value: Any, field_type: Any, where: str) -> Any:
    if _is_tuple(field_type):
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce(item, _element_type(field_type), where) for item in items)
    if isinstance(field_type, types.UnionType) or typing.get_origin(field_type) is typing.Union:
        raise TypeError(f"{where}: config fields must have one concrete type")
    if field_type is bool:
        if isinstance(value, bool):
            return value
        try:
            return parse_bool(value)
        except argparse.ArgumentTypeError as error:
            raise UserError(f"{where}: {error}") from None
    if field_type is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if field_type is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, field_type) and not isinstance(value, bool):
        return value
    raise UserError(f"{where}: expected {field_type.__name__}, got {value!r}")


def resolve_config(config_cls: type[Config], args: argparse.Namespace) -> Config:
    """Apply the precedence defaults < params.yaml section < flags to `config_cls`."""
    values: dict[str, Any] = {}
    origin = "command line"
    if args.params:
        values.update(read_params_section(args.params, args.section))
        origin = f"{args.params} [{args.section}] or command line"
    for field in dataclasses.fields(config_cls):
        flag_value = getattr(args, field.name, None)
        if flag_value is not None:
            values[field.name] = flag_value
    return build_config(config_cls, values, origin)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON-friendly data (tuples become lists)."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(config).items()
    }


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML beside a stage's output."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), "utf-8")


def require_paths(config: Any, *names: str) -> None:
    """Raise a UserError naming each path setting that was left empty."""
    missing = [_flag_name(name) for name in names if not getattr(config, name)]
    if missing:
        raise UserError(f"missing required option(s): {', '.join(missing)}")
