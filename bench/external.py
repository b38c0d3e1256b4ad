"""Convert public models nobody here wrote and report parity, Transposes, time and failure reasons.

torchvision classification and dense prediction, Hugging Face transformers built from small
configs, and torch's own recurrent layers, all with random weights: every constant-initialized
tensor perturbed and BatchNorm statistics randomized (no model hub). Needs torchvision and
transformers (optional extras), so it runs in ``.venv-zoo``::

    .venv-zoo/bin/python bench/external.py                      # every model below
    .venv-zoo/bin/python bench/external.py --models swin_t,hf_bert --json out/external.json
    .venv-zoo/bin/python bench/external.py --report out/external.json

Each model converts in its own subprocess with a timeout (bench/zoo.py's ``child_row``); the
table and totals are bench/zoo.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.zoo import RESULT_TAG, Row, _first_line, _fmt, _write_json, child_row, measure, perturb, table, totals  # noqa: E402

IMAGE = (1, 3, 64, 64)


def _images(shape: tuple = IMAGE) -> Any:
    import torch
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _tokens(n: int = 16, vocab: int = 100) -> Any:
    import torch
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(0))


def tv(name: str, shape: tuple = IMAGE, **kw: Any) -> Callable:
    """A torchvision classification model by constructor name, 10 classes."""
    def build() -> tuple:
        import torchvision
        return getattr(torchvision.models, name)(weights=None, num_classes=10, **kw), _images(shape)
    return build


def tv_segmentation(name: str, **kw: Any) -> Callable:
    def build() -> tuple:
        import torchvision
        model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=5, **kw)
        return Main(model, "out"), _images()
    return build


def tv_vit_small() -> tuple:
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=10), _images()


def tv_fpn() -> tuple:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5), _images()


class Main:
    """Factory for a wrapper module returning one entry of a model's dict/tuple output."""

    def __new__(cls, model: Any, key: Any) -> Any:
        import torch

        class _HFTuple(torch.nn.Module):  # the leading underscore: a class name Keras must sanitize
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, *args):
                out = self.model(*args)
                return out[key]

        return _HFTuple()


def hf(model_cls: str, config_cls: str, inputs: Callable, key: Any = 0, **config: Any) -> Callable:
    """A Hugging Face model built from a small config (random weights), returning ``output[key]``."""
    def build() -> tuple:
        import transformers
        cfg = getattr(transformers, config_cls)(**config)
        model = getattr(transformers, model_cls)(cfg)
        return Main(model, key), inputs()
    return build


def hf_whisper_encoder() -> tuple:
    import torch
    import transformers
    cfg = transformers.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                                     num_mel_bins=40, max_source_positions=50, vocab_size=100, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    encoder = transformers.WhisperModel(cfg).get_encoder()
    return Main(encoder, 0), torch.randn(1, 40, 100, generator=torch.Generator().manual_seed(0))


class Recurrent:
    """torch's recurrent layers, the output sequence returned (h_n dropped)."""

    def __new__(cls, kind: str, batch_first: bool, **kw: Any) -> Any:
        import torch

        class RecurrentNet(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = getattr(torch.nn, kind)(40, 32, batch_first=batch_first, **kw)

            def forward(self, x):
                return self.rnn(x)[0]

        return RecurrentNet()


def rnn(kind: str, batch_first: bool = True, **kw: Any) -> Callable:
    def build() -> tuple:
        import torch
        shape = (2, 20, 40) if batch_first else (20, 2, 40)
        return Recurrent(kind, batch_first, **kw), torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return build


def crnn() -> tuple:
    """A CRNN keyword spotter: conv front end on a (B, 1, 40, T) log-mel map, bidirectional GRU, Linear."""
    import torch
    import torch.nn as nn

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.MaxPool2d((2, 1)), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.MaxPool2d((2, 1)))
            self.gru = nn.GRU(16 * 10, 32, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(64, 12)

        def forward(self, x):
            y = self.conv(x)                        # (B, 16, 10, T)
            y = y.flatten(1, 2).transpose(1, 2)     # (B, T, 160)
            y, _ = self.gru(y)
            return self.fc(y[:, -1])

    return CRNN(), torch.randn(1, 1, 40, 50, generator=torch.Generator().manual_seed(0))


_TEXT = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)

# name -> (family, builder)
MODELS: dict[str, tuple[str, Callable]] = {
    "resnet18": ("tv-cls", tv("resnet18")),
    "resnet50": ("tv-cls", tv("resnet50")),
    "resnext50_32x4d": ("tv-cls", tv("resnext50_32x4d")),
    "mobilenet_v2": ("tv-cls", tv("mobilenet_v2")),
    "mobilenet_v3_small": ("tv-cls", tv("mobilenet_v3_small")),
    "mobilenet_v3_large": ("tv-cls", tv("mobilenet_v3_large")),
    "efficientnet_b0": ("tv-cls", tv("efficientnet_b0")),
    "efficientnet_v2_s": ("tv-cls", tv("efficientnet_v2_s")),
    "convnext_tiny": ("tv-cls", tv("convnext_tiny")),
    "regnet_y_400mf": ("tv-cls", tv("regnet_y_400mf")),
    "regnet_x_400mf": ("tv-cls", tv("regnet_x_400mf")),
    "shufflenet_v2_x0_5": ("tv-cls", tv("shufflenet_v2_x0_5")),
    "squeezenet1_1": ("tv-cls", tv("squeezenet1_1")),
    "mnasnet0_5": ("tv-cls", tv("mnasnet0_5")),
    "googlenet": ("tv-cls", tv("googlenet", aux_logits=False, init_weights=True)),
    "densenet121": ("tv-cls", tv("densenet121")),
    "vit_small_64": ("tv-cls", tv_vit_small),
    "swin_t": ("tv-cls", tv("swin_t")),
    "maxvit_t": ("tv-cls", tv("maxvit_t", shape=(1, 3, 224, 224))),
    "deeplabv3_mobilenet_v3_large": ("tv-dense", tv_segmentation("deeplabv3_mobilenet_v3_large")),
    "lraspp_mobilenet_v3_large": ("tv-dense", tv_segmentation("lraspp_mobilenet_v3_large")),
    "fcn_resnet50": ("tv-dense", tv_segmentation("fcn_resnet50")),
    "resnet18_fpn": ("tv-dense", tv_fpn),
    "hf_vit": ("hf-img", hf("ViTModel", "ViTConfig", _images, image_size=64, patch_size=16, hidden_size=64,
                             num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)),
    "hf_whisper_encoder": ("hf-audio", hf_whisper_encoder),
    "hf_wav2vec2": ("hf-audio", hf("Wav2Vec2Model", "Wav2Vec2Config", lambda: _images((1, 4000)),
                                   hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)),
    "hf_segformer": ("hf-img", hf("SegformerForSemanticSegmentation", "SegformerConfig", _images,
                                  hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                  num_attention_heads=[1, 2, 2, 4], decoder_hidden_size=64, num_labels=5)),
    "hf_mobilevit": ("hf-img", hf("MobileViTForImageClassification", "MobileViTConfig", _images, image_size=64,
                                  num_labels=10)),
    "hf_convnext": ("hf-img", hf("ConvNextForImageClassification", "ConvNextConfig", _images,
                                 hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)),
    "hf_swin": ("hf-img", hf("SwinForImageClassification", "SwinConfig", _images, image_size=64, patch_size=4,
                             embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=10)),
    "hf_bert": ("hf-text", hf("BertModel", "BertConfig", _tokens, **_TEXT)),
    "hf_distilbert": ("hf-text", hf("DistilBertModel", "DistilBertConfig", _tokens, vocab_size=100, dim=64,
                                    n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64)),
    "hf_roberta": ("hf-text", hf("RobertaModel", "RobertaConfig", _tokens, **{**_TEXT, "max_position_embeddings": 66},
                                 pad_token_id=1)),
    "hf_gpt2": ("hf-text", hf("GPT2Model", "GPT2Config", _tokens, vocab_size=100, n_embd=64, n_layer=2, n_head=4,
                              n_positions=64)),
    "hf_gpt2_lm_head": ("hf-text", hf("GPT2LMHeadModel", "GPT2Config", _tokens, vocab_size=100, n_embd=64,
                                      n_layer=2, n_head=4, n_positions=64)),
    "hf_t5_encoder": ("hf-text", hf("T5EncoderModel", "T5Config", _tokens, vocab_size=100, d_model=64, d_kv=16,
                                    d_ff=128, num_layers=2, num_heads=4)),
    "lstm_seq_first": ("rnn", rnn("LSTM", batch_first=False)),
    "lstm_batch_first": ("rnn", rnn("LSTM")),
    "lstm_2layer_bidir": ("rnn", rnn("LSTM", num_layers=2, bidirectional=True)),
    "gru": ("rnn", rnn("GRU")),
    "rnn_tanh": ("rnn", rnn("RNN")),
    "crnn_kws": ("rnn", crnn),
}


def convert_one(name: str) -> Row:
    """Build ``name`` with random weights and convert it (runs inside the child process)."""
    import torch

    from examples.common import randomize_bn_stats

    family, build = MODELS[name]
    row = Row(name, family, "")
    try:
        torch.manual_seed(0)
        model, sample = build()
        model = randomize_bn_stats(perturb(model.eval())).eval()
        row.input = "x".join(str(d) for d in sample.shape)
        row.params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        with torch.no_grad():
            model(sample)
    except Exception as e:  # the model itself, not the converter: reported as a setup failure
        row.status, row.reason = "setup", _first_line(e)
        return row
    return measure(row, model, sample)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: all); " + ", ".join(MODELS))
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per model (default 400)")
    ap.add_argument("--jobs", type=int, default=1, help="models converted at once, each in its own process (default 1)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="print the table of saved --json runs instead")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT_TAG + json.dumps(asdict(convert_one(json.loads(args.child)[0]))), flush=True)
        return 0
    if args.report:
        rows = {}
        for path in args.report:
            with open(path) as f:
                rows.update((d["model"], Row(**d)) for d in json.load(f))
        _print(list(rows.values()))
        return 0
    names = [n.strip() for n in (args.models or ",".join(MODELS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models: {', '.join(unknown)}")
    done: dict[str, Row] = {}

    def one(name: str) -> None:
        row = child_row(os.path.abspath(__file__), [name], args.timeout, Row(name, MODELS[name][0], ""))
        done[name] = row
        print(f"[external] {row.model}: {row.status} {_fmt(row.seconds, '.1f')} s {row.reason}"[:200], flush=True)
        if args.json:
            _write_json(args.json, [done[n] for n in names if n in done])

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, names))
    _print([done[n] for n in names])
    return 0


def _print(rows: list[Row]) -> None:
    print()
    print(table(rows))
    print()
    print(totals(rows))


if __name__ == "__main__":
    sys.exit(main())
