"""Sizes that follow a dynamic axis as runtime computation (issue 14, item 2): ``torch.arange(T)``,
``x.size(1) // 2``, ``torch.zeros(B, T)``, buffer slices ``buf[:, :T]``; each converted once and checked
against PyTorch at the sample's size and two others, in Keras and in fp32 LiteRT (builtin ops only).
Sizes that do not follow a dynamic axis stay folded numbers (tracer/capture/sizes.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import FP32_TOL
from tests.test_dynamic_axes import TokenModel
from tracer import convert_model
from tracer.capture.sizes import dim_size, size_math
from tracer.emitter.tflite import op_counts
from tracer.errors import ConversionError
from tracer.ir import ordered


def convert_dynamic(model: nn.Module, sample, dynamic: tuple, tflite: tuple = ("fp32",)):
    result = convert_model(model.eval(), sample, dynamic_shapes=dynamic, n_random=1, raise_on_mismatch=False,
                           tflite=tflite)
    return result


def assert_parity_at_sizes(result, name: str) -> dict[str, float]:
    """Keras and every LiteRT file match PyTorch at the sample's size and two others of ``name``;
    returns the fp32 LiteRT max abs error per size."""
    report = result.report
    assert report.ok, report.summary()
    assert len([t for t in report.trials if t.label.startswith(name + "=")]) == 2, report.summary()
    assert all(o.max_rel <= FP32_TOL for t in report.trials for o in t.outputs), report.summary()
    for lite in result.tflite_reports.values():
        assert lite.ok, lite.summary()
        sized = [t for t in lite.parity.trials if t.label.startswith(name + "=")]
        assert len(sized) == 2 and all(o.max_rel <= FP32_TOL for t in lite.parity.trials for o in t.outputs)
    for data in result.tflite.values():
        ops = op_counts(data)
        assert not [op for op in ops if op.startswith("Flex") or not op.isupper()], ops
    return result.tflite_reports["fp32"].errors_by_size() if result.tflite_reports else {}


def size_nodes(result) -> list:
    return [n for n in ordered(result.graph) if n.target in (dim_size, size_math)]


def test_token_model_arange_positions_keras_and_litert():
    torch.manual_seed(6)
    ids = torch.randint(0, 50, (2, 12))
    result = convert_dynamic(TokenModel(), ids, ({1: "seq"},))
    assert tuple(result.keras_model.inputs[0].shape) == (None, None)
    assert_parity_at_sizes(result, "seq")
    assert [n.kw["dim"] for n in size_nodes(result)] == [1]  # ids.shape[1]; the batch stays a folded number
    assert "CUMSUM" in op_counts(result.tflite["fp32"])


class SizeArithmetic(nn.Module):
    """Half the sequence, zeros(B, T // 2, 1), arange(1, T // 2 + 1) and ones(B, 2 * T - 3)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = x.shape[0], x.size(1)
        half = x[:, : t // 2]
        z = torch.zeros((b, t // 2, 1)) + 1.5  # (fx cannot trace sizes as varargs here)
        pos = torch.arange(1, t // 2 + 1, dtype=torch.float32)
        count = x.new_ones(b, 2 * t - 3).sum(1, keepdim=True)
        return half * z + pos[None, :, None], count * x[:, :1, 0]


@pytest.mark.parametrize("length", [10, 9])
def test_size_arithmetic_and_zeros_keras_and_litert(length):
    torch.manual_seed(12)
    x = torch.randn(2, length, 4)
    result = convert_dynamic(SizeArithmetic(), x, ({1: "t"},))
    assert_parity_at_sizes(result, "t")
    ops = {n.kw["op"] for n in size_nodes(result) if n.target is size_math}
    assert ops == {"floordiv", "add", "mul", "sub"}
    outs = [t.outputs[1].shape for t in result.report.trials if t.label.startswith("t=")]
    assert outs == [(2, 1)] * 2


class BufferSlice(nn.Module):
    """Learned positions and position ids read from buffers up to the sequence length."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.table = nn.Parameter(torch.randn(1, 64, 8))
        self.register_buffer("ids", torch.arange(64).expand(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        return x + self.table[:, :t] + self.ids[:, :t, None].float() * 0.01


def test_buffer_slice_up_to_the_length_keras_and_litert():
    torch.manual_seed(14)
    result = convert_dynamic(BufferSlice(), torch.randn(3, 16, 8), ({1: "t"},))
    assert tuple(result.keras_model.inputs[0].shape) == (None, None, 8)
    assert_parity_at_sizes(result, "t")
    assert "GATHER" in op_counts(result.tflite["fp32"])


def test_static_sizes_stay_folded():
    """Without dynamic_shapes, and for sizes along static axes, nothing changes: no size nodes."""
    torch.manual_seed(15)
    x = torch.randn(2, 10, 4)
    plain = convert_model(SizeArithmetic().eval(), x, n_random=1)
    assert plain.report.ok and not size_nodes(plain)
    other = convert_model(SizeArithmetic().eval(), x, dynamic_shapes=({2: "c"},), n_random=1)
    assert other.report.ok and not size_nodes(other)


class ExpandedToLength(nn.Module):
    """Position ids ``arange(T).expand(B, T)`` and a key mask expanded over the queries (B, T, T)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(19)
        self.pos = nn.Embedding(64, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.arange(x.size(1)).expand(x.shape[:2])
        keys = (x[..., 0] > 0)[:, None, :].expand(-1, x.size(1), -1)
        scores = torch.tril(x @ x.transpose(1, 2)).masked_fill(~keys, -1.0)
        return x + self.pos(ids), scores


def test_expand_to_a_dynamic_length_keras_and_litert():
    torch.manual_seed(20)
    result = convert_dynamic(ExpandedToLength(), torch.randn(2, 10, 4), ({1: "t"},))
    assert_parity_at_sizes(result, "t")


class CausalAttention(nn.Module):
    """Heads split with ``view(b, t, ...)`` and F.scaled_dot_product_attention(is_causal=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, 16)


def test_causal_attention_over_a_dynamic_length_keras_and_litert():
    """The causal mask is built from the lengths at runtime, not the sample's (10, 10) triangle."""
    torch.manual_seed(18)
    result = convert_dynamic(CausalAttention(), torch.randn(2, 10, 16), ({1: "t"},))
    assert_parity_at_sizes(result, "t")


class TwoSizesApart(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, : x.shape[2] - x.shape[1]]  # the difference line


def test_difference_of_two_dynamic_sizes_refused_naming_the_line():
    torch.manual_seed(16)
    with pytest.raises(ConversionError) as err:
        convert_dynamic(TwoSizesApart(), torch.randn(2, 3, 8), ({1: "h", 2: "w"},), tflite=())
    text = str(err.value)
    assert "the difference line" in text and "sub of two sizes that both follow dynamic axes" in text
    assert "keep that axis static" in text


@pytest.mark.parametrize("model,capture,longest",
                         [("Encoder", "fx", 16), ("GPTLike", "fx", 9), ("GPTLike", "export", 9)],
                         ids=["encoder-fx", "gpt-fx", "gpt-export"])
def test_token_models_with_masks_keras_and_litert(model, capture, longest):
    """A key padding mask (nn.TransformerEncoder) and a causal mask from ``tril(ids.new_ones(t, t))``, with
    the length bounded by the position table (``torch.export.Dim`` max)."""
    from tests import test_text_models as text
    seq = torch.export.Dim("seq", max=longest)
    result = convert_model(getattr(text, model)().eval(), text.token_inputs(), capture=capture, n_random=1,
                           dynamic_shapes=({1: seq}, {1: seq}), raise_on_mismatch=False, tflite=("fp32",))
    errors = assert_parity_at_sizes(result, "seq")
    assert len(errors) == 3, errors  # the sample and two other lengths, each within FP32_TOL above


def test_saved_keras_model_reloads_in_safe_mode_and_runs_another_length(tmp_path):
    """The witnesses are built-in keras.ops only: model.keras loads with safe_mode and runs at a new length."""
    import keras
    import numpy as np

    torch.manual_seed(17)
    model = SizeArithmetic().eval()
    result = convert_model(model, torch.randn(2, 10, 4), dynamic_shapes=({1: "t"},), n_random=0)
    path = tmp_path / "sizes.keras"
    result.keras_model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x = torch.randn(3, 14, 4)
    with torch.no_grad():
        want = model(x)
    got = loaded(x.numpy())
    for w, g in zip(want, got):
        assert g.shape == tuple(w.shape)
        scale = max(1.0, float(w.abs().max()))
        assert np.max(np.abs(np.asarray(g) - w.numpy())) <= FP32_TOL * scale
