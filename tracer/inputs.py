"""What the command line reads from the user: model files (``path.py:Name``), ``--init-args``,
``--weights``, ``--input-shape`` and ``--inputs`` files, and the sample built from them. Used by
``tracer convert`` (tracer/cli.py) and ``tracer verify`` (tracer/verify/command.py)."""
from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from pathlib import Path
from typing import Any


def parse_shape(text: str) -> list[int]:
    from tracer.errors import InputError
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise InputError(f"--input-shape {text!r} is not a comma-separated list of integers") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"--input-shape {text!r} must list positive sizes, batch first (e.g. 1,3,224,224)")
    return dims


def check_target(target: str) -> tuple[Path, str]:
    """``path/to/module.py:Name`` split and checked (the file exists), without importing it."""
    from tracer.errors import InputError
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name:
        raise InputError(f"target {target!r} must be path/to/module.py:Name")
    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    return path, name


def load_model(target: str, init_args: str | None) -> Any:
    import torch
    from tracer.errors import InputError
    path, name = check_target(target)
    module = _import_file(path)
    if not hasattr(module, name):
        found = [k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, torch.nn.Module)
                 and v.__module__ == module.__name__]
        raise InputError(f"{path} has no {name!r}" + (f"; nn.Module classes there: {', '.join(found)}" if found else ""))
    obj = getattr(module, name)
    args, kwargs = parse_init(init_args)
    if not callable(obj):
        raise InputError(f"{path}:{name} is a {type(obj).__name__}, not an nn.Module class or factory")
    try:
        model = obj(*args, **kwargs)
    except Exception as exc:
        raise InputError(f"{path}:{name}({_fmt(args, kwargs)}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{path}:{name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_file(path: Path) -> Any:
    from tracer.errors import InputError
    name = f"tracer_user_{path.stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def parse_init(text: str | None) -> tuple[list, dict]:
    from tracer.errors import InputError
    if not text:
        return [], {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--init-args is not valid JSON: {exc}") from None
    if isinstance(value, dict):
        return [], value
    if isinstance(value, list):
        return value, {}
    raise InputError("--init-args must be a JSON object (keyword arguments) or list (positional)")


def _fmt(args: list, kwargs: dict) -> str:
    return ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])


def check_weights_file(path: str) -> None:
    """The file exists and starts like a ``torch.save`` file (a zip archive or a pickle), so a
    wrong path or format is refused before torch is imported."""
    from tracer.errors import InputError
    if not Path(path).is_file():
        raise InputError(f"no such weights file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise InputError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive or a pickle); "
                         "pass a state_dict saved with torch.save(model.state_dict(), path)")


def load_weights(model: Any, path: str) -> None:
    import torch
    from tracer.errors import InputError
    check_weights_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path} is not a PyTorch checkpoint torch.load can read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else 'no message'})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path} holds a {type(state).__name__}, not a state_dict")
    misfit = state_dict_misfit(model, state)
    if misfit:
        raise InputError(f"weights {path} do not fit {type(model).__name__}: {misfit}")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise InputError(f"weights {path} do not fit the model: {str(exc).splitlines()[0][:300]}") from None


def state_dict_misfit(model: Any, state: dict, shown: int = 3) -> str:
    """What keeps ``state`` from loading into ``model``: the first missing and unexpected keys and
    shape mismatches, each with its count ("" when the keys and shapes all fit)."""
    import torch
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model" for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)]

    def first(items: list[str], what: str) -> str:
        more = f", ... ({len(items)} in all)" if len(items) > shown else ""
        return f"{what}: {', '.join(items[:shown])}{more}"
    parts = [first(items, what) for items, what in ((missing, "missing keys"), (unexpected, "unexpected keys"),
                                                    (shapes, "shape mismatches")) if items]
    if missing and unexpected and len(state) and not set(own) & set(state):
        parts.append("no key in common: a checkpoint of another model, or keys with another prefix")
    return "; ".join(parts)


def make_sample(shapes: list[list[int]], dtypes: list[str], files: list[str]) -> tuple:
    """The sample input: the first --inputs file if given, else a fixed normal draw."""
    import numpy as np
    import torch
    if files:
        arrays = load_inputs(files[0], len(shapes))
        return tuple(torch.from_numpy(a) for a in arrays)
    rng = np.random.default_rng(1234)
    out = []
    for shape, dt in zip(shapes, dtypes):
        if dt.startswith("int"):
            out.append(torch.from_numpy(rng.integers(0, 2, size=shape).astype(dt)))
        else:
            out.append(torch.from_numpy(rng.standard_normal(shape).astype(dt)))
    return tuple(out)


def load_inputs(path: str, n: int) -> list:
    import numpy as np
    import torch
    from tracer.errors import InputError
    check_file(path, "inputs")
    try:
        if path.endswith(".npy"):
            arrays = [np.load(path, allow_pickle=False)]
        elif path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                arrays = [z[k] for k in z.files]
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
            value = value if isinstance(value, (tuple, list)) else [value]
            arrays = [v.numpy() for v in value]
    except Exception as exc:
        raise InputError(f"cannot read inputs {path}: {type(exc).__name__}: {exc}") from None
    if len(arrays) != n:
        raise InputError(f"{path} holds {len(arrays)} arrays, the model takes {n} inputs")
    return [a.astype(np.float32) if a.dtype == np.float64 else a for a in arrays]


def check_runs(model: Any, sample: tuple, shapes: list) -> None:
    import torch
    from tracer.errors import InputError
    model.eval()
    try:
        with torch.no_grad():
            model(*sample)
    except Exception as exc:
        shown = " and ".join(str(tuple(t.shape)) for t in sample)
        raise InputError(f"the PyTorch model fails on input shape {shown}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:300]}") from None


def check_output_dir(path: str) -> None:
    """``-o`` can hold a conversion: not an existing file, and writable (the folder itself and the
    folder beside which the files are first written), checked before any work is done by making
    and removing a folder in each, as writing them will."""
    import tempfile
    from tracer.errors import InputError
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {path} is an existing file, not a folder; name a folder (it is created if missing)")
    for folder in ([out] if out.exists() else []) + [out.absolute().parent]:
        existing = next(p for p in [folder, *folder.parents] if p.exists())
        if not existing.is_dir():
            raise InputError(f"-o {path}: {existing} is a file, so the folder cannot be created")
        try:
            Path(tempfile.mkdtemp(prefix=".tracer-write-check-", dir=existing)).rmdir()
        except OSError as exc:
            raise InputError(f"-o {path}: cannot write in {existing} ({exc.strerror}); "
                             "choose another output folder") from None


DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")


def check_dtypes(dtypes: list[str], n_inputs: int) -> None:
    from tracer.errors import InputError
    if len(dtypes) != n_inputs:
        raise InputError(f"{len(dtypes)} --input-dtype given for {n_inputs} --input-shape")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise InputError(f"--input-dtype {unknown[0]!r} is not one of {', '.join(DTYPES)}")


def check_file(path: str, what: str) -> None:
    from tracer.errors import InputError
    if not Path(path).is_file():
        raise InputError(f"no such {what} file: {path}")
