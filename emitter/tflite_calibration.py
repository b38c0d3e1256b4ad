"""Full-integer (int8) calibration data for the LiteRT export: the accepted sources (arrays, a folder
of .npy / .npz / image files, a callable), each sample checked against the model's inputs in PyTorch's
layout and permuted into the layouts the conversion chose for the Keras inputs. A dynamic axis takes
samples of any size; random samples and images take the sample's size there."""
from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from tracer.errors import InputError
from tracer.ir import Phys

CALIB_LIMIT = 256  # representative samples used at most (the converter's own advice: ~100-500)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}


class CalibrationError(InputError):
    """Full-integer quantization was asked for without usable calibration data."""


def check_calibration(calib: Any, random_calibration: bool) -> None:
    """Refuse int8 without calibration data (unless random calibration was asked for) or with a missing path."""
    if calib is None and not random_calibration:
        raise CalibrationError(
            "full-integer int8 needs calibration data: pass calib= (a numpy array of samples in "
            "PyTorch layout, a folder of .npy files or images, or a callable yielding input lists), "
            "or --calib FILE.npy|DIR on the command line. random_calibration=True "
            "(--random-calibration) calibrates on noise, which makes the int8 accuracy meaningless.")
    if isinstance(calib, (str, Path)) and not Path(calib).exists():
        raise CalibrationError(f"calibration path {calib} does not exist")


def calibration_dataset(keras_model: Any, calib: Any, layouts: Sequence[Phys], random_calibration: bool,
                        limit: int = CALIB_LIMIT, sample_shapes: Sequence[tuple] | None = None
                        ) -> Callable[[], Iterator[dict[str, np.ndarray]]]:
    """A representative_dataset callable yielding {input name: sample} in the Keras model's layouts.
    ``sample_shapes`` (PyTorch layout) give the sizes of dynamic axes for random and image samples;
    real samples may have any size there."""
    check_calibration(calib, random_calibration)
    names = [t.name for t in keras_model.inputs]  # the serving signature's input names
    torch_shapes = [_torch_shape(tuple(t.shape), p) for t, p in zip(keras_model.inputs, layouts)]
    axes = [p.perm[0] if p is not None and p.perm else 0 for p in layouts]  # an RNN's h0 (L*D, B, H): 1
    sizes = _fill_dynamic(torch_shapes, sample_shapes, axes)
    if calib is None and any(d is None for s, b in zip(sizes, axes) for i, d in enumerate(s) if i != b):
        raise CalibrationError("random int8 calibration over dynamic axes needs the sample's sizes "
                               "(sample_shapes=); or pass calib= with real samples")
    if calib is None:
        warnings.warn("int8 calibration on random normal inputs (random_calibration=True): the quantization "
                      "ranges do not reflect real data, so the int8 model's accuracy is meaningless",
                      UserWarning, stacklevel=3)

    dtypes = [str(t.dtype) for t in keras_model.inputs]

    def dataset() -> Iterator[dict[str, np.ndarray]]:
        count = 0
        for arrays in itertools.islice(calibration_samples(calib, torch_shapes, dtypes, sizes, axes), limit):
            # by name: the converter's own input order need not be the Keras model's
            yield {n: np.ascontiguousarray(np.transpose(a, p.perm)) for n, a, p in zip(names, arrays, layouts)}
            count += 1
        if count == 0:
            raise CalibrationError("the calibration data yielded no samples")

    return dataset


def calibration_samples(calib: Any, torch_shapes: Sequence[tuple], dtypes: Sequence[str] | None = None,
                        sizes: Sequence[tuple] | None = None, batch_axes: Sequence[int] | None = None
                        ) -> Iterator[list[np.ndarray]]:
    """One checked sample at a time, a list of arrays in PyTorch layout with batch 1 (random ones
    of ``dtypes`` when ``calib`` is None). ``torch_shapes``: input shapes, any value on the batch axis,
    None on a dynamic axis (any size); ``sizes``: the same with the sample's sizes there, for random
    samples and images (default ``torch_shapes``); ``batch_axes``: each input's batch axis (default 0;
    1 for an RNN state ``h0`` that is a model input)."""
    sizes = list(sizes or torch_shapes)
    axes = list(batch_axes or [0] * len(torch_shapes))
    if calib is None:
        rng = np.random.default_rng(0)
        dts = list(dtypes or ["float32"] * len(torch_shapes))
        ones = [_one(s, b) for s, b in zip(sizes, axes)]
        raw: Iterable = ([rng.integers(0, 2, shape).astype(d) if not d.startswith("float")
                          else rng.standard_normal(shape).astype(np.float32) for shape, d in zip(ones, dts)]
                         for _ in range(64))
    else:
        raw = _source(calib, sizes, axes)
    for sample in raw:
        yield _check_sample(sample, torch_shapes, axes)


def _one(shape: tuple, axis: int) -> tuple:
    return tuple(1 if i == axis else n for i, n in enumerate(shape))


def _fill_dynamic(torch_shapes: list[tuple], sample_shapes: Sequence[tuple] | None,
                  axes: Sequence[int]) -> list[tuple]:
    """Input shapes with the unknown sizes off the batch axis (dynamic axes) taken from the sample's shapes."""
    if not sample_shapes or len(sample_shapes) != len(torch_shapes):
        return torch_shapes
    return [tuple(d if d is not None or i == b else int(o) for i, (d, o) in enumerate(zip(s, o_s)))
            if len(o_s) == len(s) else s for s, o_s, b in zip(torch_shapes, sample_shapes, axes)]


def _torch_shape(keras_shape: tuple, phys: Phys) -> tuple:
    """Torch shape (batch None) of an input whose Keras shape is ``keras_shape``."""
    out: list = [None] * len(keras_shape)
    for keras_axis, torch_axis in enumerate(phys.perm):
        out[torch_axis] = keras_shape[keras_axis]
    return tuple(out)


def _source(calib: Any, torch_shapes: Sequence[tuple], axes: Sequence[int]) -> Iterable:
    """The accepted calibration sources as an iterable of samples (one array or a list per sample)."""
    if callable(calib):
        return calib()
    if isinstance(calib, (str, Path)):
        path = Path(calib)
        if path.is_dir():
            return _folder_samples(path, torch_shapes, axes)
        if path.is_file() and path.suffix == ".npy":
            return _split([np.load(path, allow_pickle=False)], torch_shapes, axes)
        raise CalibrationError(f"calibration path {path} is neither a folder nor a .npy file")
    if isinstance(calib, np.ndarray):
        return _split([calib], torch_shapes, axes)
    if isinstance(calib, (list, tuple)) and calib and all(isinstance(a, np.ndarray) for a in calib):
        return _split(list(calib), torch_shapes, axes)
    raise CalibrationError(f"calibration data must be a numpy array, a list of arrays (one per input), a "
                           f"folder, a .npy file or a callable; got {type(calib).__name__}")


def _split(arrays: list[np.ndarray], torch_shapes: Sequence[tuple], axes: Sequence[int]
           ) -> Iterator[list[np.ndarray]]:
    """Arrays holding N samples each on their batch axis (or one sample without it) -> one sample at a time."""
    if len(arrays) != len(torch_shapes):
        raise CalibrationError(f"calibration gives {len(arrays)} array(s), the model takes {len(torch_shapes)} inputs")
    batched = [a if a.ndim == len(s) else np.expand_dims(a, b) for a, s, b in zip(arrays, torch_shapes, axes)]
    for i in range(min(a.shape[b] for a, b in zip(batched, axes))):
        yield [np.take(a, [i], axis=b) for a, b in zip(batched, axes)]


def _folder_samples(path: Path, torch_shapes: Sequence[tuple], axes: Sequence[int]) -> Iterator[list[np.ndarray]]:
    """Each .npy (samples of a one-input model), .npz (one array per input, in order) or image
    file of the folder, in name order."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in {".npy", ".npz", *_IMAGE_SUFFIXES})
    if not files:
        raise CalibrationError(f"calibration folder {path} holds no .npy, .npz or image files")
    for f in files:
        if f.suffix == ".npy":
            yield from _split([np.load(f, allow_pickle=False)], torch_shapes, axes)
        elif f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                arrays = [z[k] for k in z.files]
            yield from _split(arrays, torch_shapes, axes)
        else:
            yield [_load_image(f, torch_shapes)]


def _load_image(path: Path, torch_shapes: Sequence[tuple]) -> np.ndarray:
    """An image file as a (1, C, H, W) float32 array in [0, 1], resized to the model's input."""
    import tensorflow as tf

    shape = torch_shapes[0]
    if len(torch_shapes) != 1 or len(shape) != 4:
        raise CalibrationError("image calibration needs a model with one (N, C, H, W) input; "
                               f"it takes {list(torch_shapes)}")
    _, c, h, w = shape
    if c not in (1, 3):
        raise CalibrationError(f"image calibration needs 1 or 3 input channels, the model has {c}; give .npy files")
    image = tf.io.decode_image(path.read_bytes(), channels=c, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (h, w)).numpy()
    return np.transpose(image, (2, 0, 1))[None].astype(np.float32)


def _check_sample(sample: Any, torch_shapes: Sequence[tuple], axes: Sequence[int]) -> list[np.ndarray]:
    arrays = [sample] if not isinstance(sample, (list, tuple)) else list(sample)
    arrays = [np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a) for a in arrays]
    if len(arrays) != len(torch_shapes):
        raise CalibrationError(f"a calibration sample has {len(arrays)} array(s), "
                               f"the model takes {len(torch_shapes)} inputs")
    out = []
    for a, s, b in zip(arrays, torch_shapes, axes):
        a = np.expand_dims(a, b) if a.ndim == len(s) - 1 else a
        if a.ndim != len(s) or any(d is not None and n != d and i != b for i, (n, d) in enumerate(zip(a.shape, s))):
            want = ", ".join("N" if i == b else "any" if d is None else str(d) for i, d in enumerate(s))
            raise CalibrationError(f"calibration sample of shape {a.shape} does not fit the input shape "
                                   f"({want}) (PyTorch layout; 'any' is a dynamic axis)")
        out.append(a.astype(np.float32) if a.dtype.kind == "f" else a)
    return out
