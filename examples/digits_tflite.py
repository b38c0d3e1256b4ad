"""A measured accuracy table: PyTorch -> Keras -> LiteRT fp32 / fp16 / dynamic-range / int8.

An FBNet-style CNN (inverted-residual blocks: 1x1 expand, 3x3 depthwise, 1x1 project, with
BatchNorm, one grouped 1x1 with a channel shuffle) is trained for about a minute on CPU on
scikit-learn's digits (1,797 8x8 images, shipped with the package: no download), upsampled to
16x16. It is converted with every TFLite variant (int8 calibrated on 200 training images) and
each is scored on the held-out quarter of the data, with its top-1 agreement with PyTorch.

Run:  python examples/digits_tflite.py [--epochs 60] [--out out/digits]
Needs scikit-learn.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SIZE = 16  # the 8x8 digits are upsampled (bilinear) to SIZE x SIZE
CALIB = 200  # training images used to calibrate int8
KINDS = ("fp32", "fp16", "dynamic", "int8")


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, relu: bool = True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        super().__init__(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class IRFBlock(nn.Module):
    """FBNet's inverted residual: pw expand (optionally grouped + shuffle), dw 3x3, pw project."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, groups: int = 1):
        super().__init__()
        mid = cin * expand
        self.pw = ConvBN(cin, mid, groups=groups)
        self.shuffle = ChannelShuffle(groups) if groups > 1 else nn.Identity()
        self.dw = ConvBN(mid, mid, 3, stride, groups=mid)
        self.pwl = ConvBN(mid, cout, groups=groups, relu=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.pwl(self.dw(self.shuffle(self.pw(x))))
        return x + y if self.residual else y


class DigitsNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = ConvBN(1, 16, 3)
        self.blocks = nn.Sequential(
            IRFBlock(16, 24, 3, 2),             # 8x8
            IRFBlock(24, 24, 3, 1, groups=2),   # grouped 1x1 convs + channel shuffle
            IRFBlock(24, 32, 4, 2),             # 4x4
            IRFBlock(32, 32, 4, 1),
        )
        self.head = ConvBN(32, 128)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.pool(self.head(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


@dataclass
class Digits:
    x_train: np.ndarray  # (N, 1, SIZE, SIZE) float32, PyTorch layout
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(seed: int = 0) -> Digits:
    """The digits, stratified 75/25 split, scaled to [0, 1], upsampled and standardized."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = torch.from_numpy((data.images / 16.0).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).numpy()
    x_tr, x_te, y_tr, y_te = train_test_split(x, data.target, test_size=0.25, stratify=data.target, random_state=seed)
    return Digits(x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64))


def train(data: Digits, epochs: int, seed: int = 0, batch: int = 64, verbose: bool = False) -> DigitsNet:
    """AdamW with a one-cycle schedule and random 1-pixel shifts; deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # weight init
    model = DigitsNet()
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb = _shift(x[idx], g)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose and (epoch + 1) % 10 == 0:
            print(f"  epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}")
    return model.eval()


def _shift(x: torch.Tensor, g: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Shift the whole batch by up to ``pixels`` in each direction (background is -1)."""
    dy, dx = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=g))
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    h, w = x.shape[-2:]
    return padded[..., pixels + dy:pixels + dy + h, pixels + dx:pixels + dx + w]


@dataclass
class Row:
    name: str
    top1: float
    agreement: float | None  # with PyTorch fp32's top-1
    size_bytes: int | None = None


def evaluate(model: DigitsNet, data: Digits, kinds=KINDS, int8_io: bool = False) -> tuple[list[Row], object]:
    """Convert (with LiteRT parity through tracer), then score every variant on the test split."""
    from tracer import convert_model
    from tracer.verify.litert import LiteRTRunner, keras_input_names
    from tracer.verify.parity import run_keras, run_torch

    result = convert_model(model, torch.from_numpy(data.x_test[:1]), tflite=kinds, calib=data.x_train[:CALIB],
                           int8_io=int8_io)
    test = [data.x_test]
    ref = run_torch(model, test)[0].argmax(-1)
    rows = [Row("PyTorch fp32", _acc(ref, data.y_test), None)]
    keras_pred = run_keras(result.keras_model, test, result.input_layouts, result.output_layouts)[0].argmax(-1)
    rows.append(Row("Keras fp32", _acc(keras_pred, data.y_test), _acc(keras_pred, ref)))
    names = keras_input_names(result.keras_model)
    for kind, flatbuffer in result.tflite.items():
        runner = LiteRTRunner(flatbuffer, names)
        pred = run_keras(runner, test, result.input_layouts, result.output_layouts)[0].argmax(-1)
        label = {"dynamic": "dynamic-range"}.get(kind, kind)
        if kind == "int8":
            label = "full int8" + (" (int8 I/O)" if int8_io else "")
        rows.append(Row(f"TFLite {label}", _acc(pred, data.y_test), _acc(pred, ref), len(flatbuffer)))
    return rows, result


def _acc(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(pred == labels))


def table(rows: list[Row], n_test: int) -> str:
    lines = [f"top-1 on the {n_test} held-out digits ({SIZE}x{SIZE})", "",
             "| model | top-1 | agrees with PyTorch | size |", "|---|---:|---:|---:|"]
    for r in rows:
        agree = "-" if r.agreement is None else f"{100 * r.agreement:.2f}%"
        size = "-" if r.size_bytes is None else f"{r.size_bytes / 1024:.1f} KiB"
        lines.append(f"| {r.name} | {100 * r.top1:.2f}% | {agree} | {size} |")
    return "\n".join(lines)


def run(epochs: int = 60, seed: int = 0, verbose: bool = True, int8_io: bool = False) -> tuple[list[Row], object]:
    data = load_digits(seed)
    start = time.perf_counter()
    model = train(data, epochs, seed, verbose=verbose)
    if verbose:
        print(f"trained {epochs} epochs in {time.perf_counter() - start:.1f}s "
              f"({sum(p.numel() for p in model.parameters()):,} parameters)")
    rows, result = evaluate(model, data, int8_io=int8_io)
    if verbose:
        print(table(rows, len(data.y_test)))
        print()
        for report in result.tflite_reports.values():
            print(report.summary())
    return rows, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--int8-io", action="store_true", help="int8 model inputs/outputs")
    p.add_argument("--out", default=None, help="write model.keras, model_KIND.tflite and report.json here")
    args = p.parse_args()
    torch.set_num_threads(1)  # this small network trains faster on one thread than on several
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")  # Keras' eager convolutions on several batch sizes log retracing warnings
    rows, result = run(args.epochs, args.seed, int8_io=args.int8_io)
    if args.out:
        from tracer.emitter.save import save_outputs
        report = {"table": [r.__dict__ for r in rows],
                  "tflite": {k: r.to_dict() for k, r in result.tflite_reports.items()}}
        files = {f"model_{k}.tflite": b for k, b in result.tflite.items()}
        save_outputs(result.keras_model, args.out, report, saved_model=False, extra_files=files)
        print(f"wrote {args.out}/")


if __name__ == "__main__":
    main()
