"""The batch manifest: a YAML or JSON file with a top-level ``models:`` list, read and checked
before torch or TensorFlow is imported.

Each entry: ``name``, ``model`` (``path.py:ClassOrFactory``, relative to the manifest's folder),
``input_shapes`` (a list of shapes), optional ``input_dtypes``, ``init_args`` (object or list),
``weights`` (a state_dict file), ``options`` (``convert_model``'s argument names, or the
``tracer convert`` option names: ``fold_bn``, ``channels_last_io``, ``tflite``, ``calib``, ``tol``,
``n_random``, ``capture``, ``verify``, ...), and ``timeout`` (seconds), ``memory_mb`` and ``cpus``
for its worker. A top-level ``defaults:`` mapping gives ``options``, ``timeout``, ``memory_mb`` and
``cpus`` for every entry. Anything wrong raises one :class:`ManifestError` naming the entry and field.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracer.errors import InputError
from tracer.options import convert_options

DEFAULT_TIMEOUT_S = 1800.0
DEFAULT_MEMORY_MB = 8192
DEFAULT_CPUS = 1.0
ENTRY_FIELDS = ("name", "model", "init_args", "input_shapes", "input_dtypes", "weights", "options",
                "timeout", "memory_mb", "cpus")
RESOURCE_FIELDS = ("timeout", "memory_mb", "cpus")
# convert_model's argument names that the CLI spells differently
OPTION_ALIASES = {"n_random": "random_inputs", "extra_inputs": "inputs"}
# `tracer convert` options a manifest entry sets through its own fields, or that make no sense in a batch
NOT_OPTIONS = {"target", "input_shape", "input_dtype", "init_args", "weights", "output", "debug", "quiet", "help"}
PATH_OPTIONS = {"calib", "inputs"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ManifestError(InputError):
    """The manifest cannot be used: one line naming the file, the entry and the field."""


@dataclass(frozen=True)
class Entry:
    """One model of the manifest, checked; paths are resolved against the manifest's folder."""

    name: str
    model: str  # path.py:Name as written
    model_path: Path  # resolved
    attr: str
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...] | None
    init_args: Any
    weights: Path | None
    options: dict
    timeout: float
    memory_mb: int | None
    cpus: float
    spec: dict = field(repr=False)  # the entry as written, defaults merged: part of the resume key

    def argv(self, outdir: str) -> list[str]:
        """The ``tracer convert`` arguments for this entry, writing into ``outdir``."""
        argv = [f"{self.model_path}:{self.attr}"]
        for shape in self.input_shapes:
            argv += ["--input-shape", ",".join(str(d) for d in shape)]
        for dt in self.input_dtypes or ():
            argv += ["--input-dtype", dt]
        if self.init_args is not None:
            argv += ["--init-args", json.dumps(self.init_args)]
        if self.weights is not None:
            argv += ["--weights", str(self.weights)]
        actions = convert_actions()
        for dest, value in self.options.items():
            argv += _option_argv(actions[dest], value)
        return argv + ["-o", outdir]

    def key(self, version: str) -> str:
        """Content hash of the entry, the model's source file, the weights file and tracer's version."""
        h = hashlib.sha256(json.dumps(self.spec, sort_keys=True, default=str).encode())
        h.update(version.encode())
        for path in (self.model_path, self.weights):
            h.update(file_digest(path).encode() if path is not None else b"-")
        return h.hexdigest()

    def missing_file(self) -> str | None:
        """The message of tracer convert's bad-input check for a missing model or weights file."""
        if not self.model_path.is_file():
            return f"no such file: {self.model_path}"
        if self.weights is not None and not self.weights.is_file():
            return f"no such weights file: {self.weights}"
        return None


def file_digest(path: Path) -> str:
    if not path.is_file():
        return "missing"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_actions() -> dict[str, argparse.Action]:
    """``tracer convert``'s options by destination name, as the command line defines them (tracer/options.py),
    less those an entry sets through its own fields."""
    return {dest: a for dest, a in convert_options().items() if dest not in NOT_OPTIONS}


def load(path: str | Path) -> list[Entry]:
    """Read and check a manifest file; raises :class:`ManifestError`."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"no such manifest: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError or yaml.YAMLError: one line with the position
        raise ManifestError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                            f"{' '.join(str(exc).split())}") from None
    return parse(data, path)


def parse(data: Any, path: Path) -> list[Entry]:
    if not isinstance(data, dict) or "models" not in data:
        raise ManifestError(f"{path}: the top level must be a mapping with a 'models:' list")
    unknown = sorted(set(data) - {"models", "defaults"})
    if unknown:
        raise ManifestError(f"{path}: unknown top-level key {unknown[0]!r} (expected 'models' and 'defaults')")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ManifestError(f"{path}: defaults: must be a mapping")
    bad = sorted(set(defaults) - {"options", *RESOURCE_FIELDS})
    if bad:
        raise ManifestError(f"{path}: defaults.{bad[0]}: unknown field (allowed: options, {', '.join(RESOURCE_FIELDS)})")
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise ManifestError(f"{path}: models: must be a non-empty list of entries")
    actions = convert_actions()
    _check_options(defaults.get("options") or {}, actions, lambda f, m: ManifestError(
        f"{path}: defaults.options.{f}: {m}"))
    entries, seen = [], {}
    for i, raw in enumerate(models):
        entry = _entry(raw, i, defaults, actions, path)
        if entry.name in seen:
            raise ManifestError(f"{path}: models[{i}] ({entry.name}): name: also used by models[{seen[entry.name]}]")
        seen[entry.name] = i
        entries.append(entry)
    return entries


def _entry(raw: Any, i: int, defaults: dict, actions: dict, path: Path) -> Entry:
    label = f"models[{i}]" + (f" ({raw['name']})" if isinstance(raw, dict) and isinstance(raw.get("name"), str) else "")

    def fail(fld: str, msg: str) -> ManifestError:
        return ManifestError(f"{path}: {label}: {fld}: {msg}")

    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: {label}: must be a mapping with name, model, input_shapes, ...")
    unknown = sorted(set(raw) - set(ENTRY_FIELDS))
    if unknown:
        raise fail(unknown[0], f"unknown field (allowed: {', '.join(ENTRY_FIELDS)})")
    for req in ("name", "model", "input_shapes"):
        if raw.get(req) is None:
            raise fail(req, "missing (required)")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail("name", f"{name!r} must be a folder name: letters, digits, '_', '-', '.'")
    model = raw["model"]
    mpath, sep, attr = model.rpartition(":") if isinstance(model, str) else ("", "", "")
    if not sep or not mpath.endswith(".py") or not attr.isidentifier():
        raise fail("model", f"{model!r} must be path/to/module.py:ClassOrFactory")
    shapes = _shapes(raw["input_shapes"], fail)
    dtypes = raw.get("input_dtypes")
    if dtypes is not None and (not isinstance(dtypes, list) or len(dtypes) != len(shapes)
                               or not all(isinstance(d, str) for d in dtypes)):
        raise fail("input_dtypes", f"must be a list of {len(shapes)} dtype name(s), one per input shape")
    init_args = raw.get("init_args")
    if init_args is not None and not isinstance(init_args, (dict, list)):
        raise fail("init_args", "must be a mapping (keyword arguments) or a list (positional)")
    weights = raw.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise fail("weights", "must be a file path")
    if not isinstance(raw.get("options") or {}, dict):
        raise fail("options", "must be a mapping of convert_model argument names to values")
    options = {**(defaults.get("options") or {}), **(raw.get("options") or {})}
    options = _check_options(options, actions, lambda f, m: fail(f"options.{f}", m))
    base = path.resolve().parent
    options = {k: _resolve_paths(v, base) if k in PATH_OPTIONS else v for k, v in options.items()}
    res = {k: raw.get(k, defaults.get(k)) for k in RESOURCE_FIELDS}
    timeout = _positive(res["timeout"], DEFAULT_TIMEOUT_S, "timeout", fail)
    memory = None if "memory_mb" in raw and raw["memory_mb"] is None else int(
        _positive(res["memory_mb"], DEFAULT_MEMORY_MB, "memory_mb", fail))
    cpus = _positive(res["cpus"], DEFAULT_CPUS, "cpus", fail)
    spec = {k: raw.get(k) for k in ENTRY_FIELDS if k not in RESOURCE_FIELDS} | {"options": options}
    return Entry(name=name, model=model, model_path=(base / mpath).resolve(), attr=attr, input_shapes=shapes,
                 input_dtypes=tuple(dtypes) if dtypes else None, init_args=init_args,
                 weights=(base / weights).resolve() if weights else None, options=options, timeout=timeout,
                 memory_mb=memory, cpus=cpus, spec=spec)


def _shapes(value: Any, fail) -> tuple[tuple[int, ...], ...]:
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(d, int) for d in value)):
        value = [value]  # one shape given on its own
    if not isinstance(value, list) or not value:
        raise fail("input_shapes", "must be a list of shapes, e.g. [[1, 3, 224, 224]]")
    shapes = []
    for s in value:
        dims = [d.strip() for d in s.split(",")] if isinstance(s, str) else s
        try:
            dims = [int(d) for d in dims] if isinstance(dims, list) and not any(isinstance(d, bool) for d in dims) else None
        except ValueError:
            dims = None
        if not dims or any(d <= 0 for d in dims):
            raise fail("input_shapes", f"{s!r} must be a list of positive sizes, batch first (e.g. [1, 3, 224, 224])")
        shapes.append(tuple(dims))
    return tuple(shapes)


def _positive(value: Any, default: float, name: str, fail) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise fail(name, f"{value!r} must be a positive number")
    return float(value)


def _resolve_paths(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_resolve_paths(v, base) for v in value]
    return str((base / value).resolve()) if isinstance(value, str) else value


def _check_options(options: Any, actions: dict, fail) -> dict:
    """Options by the CLI's destination names; every value checked against its option's kind."""
    if not isinstance(options, dict):
        raise fail("", "must be a mapping")
    out = {}
    for name, value in options.items():
        dest = OPTION_ALIASES.get(name, name)
        action = actions.get(dest)
        if action is None:
            known = sorted({*actions, *OPTION_ALIASES} - set(OPTION_ALIASES.values()))
            raise fail(name, f"unknown option (known: {', '.join(known)})")
        out[dest] = _check_value(action, value, lambda m: fail(name, m))
    return out


def _check_value(action: argparse.Action, value: Any, fail) -> Any:
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise fail(f"{value!r} must be true or false")
        return value
    many = isinstance(action, argparse._AppendAction)
    values = (value if isinstance(value, list) else [value]) if many else [value]
    for v in values:
        kind = action.type or str
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise fail(f"{v!r} must be a {getattr(kind, '__name__', 'value')}")
        try:
            kind(v)
        except (TypeError, ValueError):
            raise fail(f"{v!r} must be a {getattr(kind, '__name__', 'value')}") from None
        if action.choices is not None and kind(v) not in action.choices:
            raise fail(f"{v!r} is not one of {', '.join(map(str, action.choices))}")
    return values if many else value


def _option_argv(action: argparse.Action, value: Any) -> list[str]:
    flag = action.option_strings[-1]
    if action.nargs == 0:
        return [flag] if value else []
    values = value if isinstance(value, list) else [value]
    return [a for v in values for a in (flag, str(v))]
