"""The typed-TOML schema: one coercion policy for every file and override (experiments, studies,
sweeps, block and mixer options), strict tables, names, overrides, TOML files.

    cfg = from_dict(MyDataclass, toml_table, where="study 'x' (path)")   # unknown/missing/mistyped key: UserError
    value = check_value("train.lr", 3e-4, float)
    key, value = parse_override("train.lr=3e-4")

The bottom floor of the package: it imports nothing of ours but errors.py, so that config, models
(block and mixer options) and studies all validate through it without importing each other.
"""
from __future__ import annotations

import copy
import dataclasses
import keyword
import math
import re
import tomllib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .errors import UserError, choices

# One coercion policy for every file and override: experiments, studies, sweeps and block options.
#   int   <- an integer, or a float with a whole value (1e3 -> 1000, 64.0 -> 64); 64.5 is an error
#   float <- a finite float or an integer (3 -> 3.0); nan and inf are errors
#   bool  <- true / false only (not 0 / 1, not "true")
#   str   <- a string only: strings never become numbers or booleans ("1e-3", "5" are errors)
#   list, list[T], dict <- a TOML array / table (items by the same rules); Optional[T] <- T or unset
# Anything else is a one-line UserError naming the key, the value and the type wanted.
TYPE_NAMES = {int: "int (a whole number)", float: "float (a number)", bool: "bool (true or false)",
              str: "str (a quoted string)", list: "a list", dict: "a table"}


def _type_name(tp: Any) -> str:
    return TYPE_NAMES.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)).replace("typing.", ""))


def check_value(key: str, value: Any, tp: Any) -> Any:
    """`value` converted to the type `tp` under the policy above, or a UserError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        if len(args) == 1:  # Optional[T]: T's own message
            return check_value(key, value, args[0])
        for arg in args:
            try:
                return check_value(key, value, arg)
            except UserError:
                pass
        raise UserError(f"{key} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp in (list, List) or origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [check_value(f"{key}[]", v, item_tp) for v in value]
    if tp in (dict, Dict) or origin in (dict, Dict):
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if isinstance(value, bool) != (tp is bool):  # bools are ints in Python, never in a config
        raise UserError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, tp):
        raise UserError(f"{key} must be {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: Dict[str, Any], where: str = "", prefix: str = "") -> Any:
    """Build the dataclass `cls` from a plain dict (a TOML table): an unknown key, a missing
    required key (a field without a default) or a wrong type is a one-line UserError; dataclass-typed
    fields are read from sub-tables. `where` (e.g. "study 'x' (path)") prefixes every message;
    `prefix` is the dotted path of `data` ("train.")."""
    loc = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise UserError(f"{loc}{prefix.rstrip('.') or 'the file'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls)}  # "key": a keyword such as `is`
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f" in [{prefix.rstrip('.')}]" if prefix else ""
        raise UserError(f"{loc}unknown key '{prefix}{unknown[0]}'{section}; valid: {choices(fields)}")
    kwargs = {}
    for key, f in fields.items():
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                help_ = f.metadata.get("help")
                raise UserError(f"{loc}missing key '{prefix}{key}'" + (f" ({help_})" if help_ else ""))
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, data[key], where, f"{prefix}{key}.")
        else:
            try:
                kwargs[f.name] = check_value(f"{prefix}{key}", data[key], tp)
            except UserError as e:
                raise UserError(f"{loc}{e}") from None
    return cls(**kwargs)


def table_class(name: str, keys: Dict[str, tuple]) -> type:
    """A dataclass for a table declared as {key: (type, required, help)} (study and sweep files):
    optional keys default to None, so `from_dict` applies the same policy as to experiments."""
    spec = []
    for k, (typ, required, help_) in sorted(keys.items(), key=lambda kv: not kv[1][1]):  # required first
        meta = {"help": help_, "key": k}
        spec.append((f"{k}_" if keyword.iskeyword(k) else k, typ if required else Optional[typ],
                     field(metadata=meta) if required else field(default=None, metadata=meta)))
    return dataclasses.make_dataclass(name, spec)


# Names become folder names (runs/<name>) and MLflow run names: no separators, no leading dot.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(kind: str, value: Any) -> str:
    """An experiment, study or variant name: letters, digits and . _ - (not first), at most 128
    characters; so `runs/<name>` stays inside `runs/`. Returns the name; a UserError otherwise."""
    if not isinstance(value, str) or not SAFE_NAME.match(value):
        raise UserError(f"{kind} {value!r} is not allowed: use letters, digits and . _ - (starting with a letter "
                        f"or digit, at most 128 characters); it names the run folder")
    return value



# ---------------------------------------------------------------------------------------------
# Files, tables and overrides
# ---------------------------------------------------------------------------------------------

def resolve_named_file(name_or_path: str | Path, folder: Path, kind: str, names: List[str],
                       accept=None) -> Path:
    """A `kind` is a path to a TOML file or the name of one in `folder` (`accept(path)` may refuse
    a bundled file of another kind). Unknown names raise a UserError listing `names`."""
    p = Path(name_or_path)
    if p.is_dir():
        raise UserError(f"{kind} {str(p)!r} is a folder, not a .toml file; bundled {kind}s: {choices(names)}")
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise UserError(f"{kind} file {str(p)!r} not found; bundled {kind}s: {choices(names)}")
        return p
    candidate = folder / f"{name_or_path}.toml"
    if not candidate.is_file() or (accept is not None and not accept(candidate)):
        raise UserError(f"unknown {kind} {str(name_or_path)!r}; available: {choices(names)} (or a path to a .toml file)")
    return candidate


def read_toml(path: Path) -> Dict[str, Any]:
    """A TOML file as a dict; malformed TOML, text that is not UTF-8 (TOML's encoding) or an
    unreadable file is a one-line UserError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: malformed TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8: re-save it as UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a .toml file") from None


def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 3e-4). The value is TOML; a bare word is a string."""
    if "=" not in item:
        raise UserError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key:
        raise UserError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(data: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Set dotted keys in a nested dict (a copy). Validation happens when the dict is converted."""
    data = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"cannot set {key!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def typed_value(where: str, key: str, value: Any, typ: type) -> Any:
    """`value` as `typ` under the one coercion policy (check_value), messages prefixed by `where`."""
    try:
        return check_value(key, value, typ)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def strict_table(where: str, data: Mapping[str, Any], keys: Dict[str, tuple]) -> Dict[str, Any]:
    """Check a TOML table declared as keys = {name: (type, required, help)} through the typed
    dataclass validation of config.py (unknown, missing or mistyped key -> one-line UserError).
    Returns the keys given, converted."""
    table = from_dict(table_class("Table", keys), dict(data), where)
    return {f.metadata["key"]: getattr(table, f.name) for f in dataclasses.fields(table) if f.metadata["key"] in data}


def flatten_overrides(data: Mapping[str, Any], where: str, sections: tuple) -> Dict[str, Any]:
    """`{"model.block" = {...}}` and `{model = {block = {...}}}` both -> {"model.block": {...}}.

    Tables are walked through the config's sections only: `model.block` is itself a table value
    and must be set whole (or key by key with dotted keys such as "model.block.kernel")."""
    out: Dict[str, Any] = {}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise UserError(f"{where}: {key!r} is a config section; set its keys, e.g. \"{key}.KEY\" = VALUE")
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out




_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(key: str, text: str) -> float:
    """'90m', '2h', '1h30m', '45s' or '3600' (seconds) -> seconds > 0; else a one-line UserError."""
    m = _DURATION.match(str(text).strip().lower()) if text else None
    if m is None or not any(m.groups()):
        raise UserError(f"{key} must be a duration such as 90m, 2h, 1h30m or 3600s, got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if not total > 0:
        raise UserError(f"{key} must be a positive duration, got {text!r}")
    return total


__all__ = ["parse_duration", "SAFE_NAME", "TYPE_NAMES", "apply_overrides", "check_name", "check_value", "flatten_overrides", "from_dict",
           "parse_override", "read_toml", "resolve_named_file", "strict_table", "table_class", "typed_value"]
