"""How far 8-bit activations can take a corpus model: qpasses' grids, per-channel grids, learned scales.

The real-model issue's goal puts the default within 1% of the weights-only ceiling. Where it is not
(ppocr_rec, slanet_plus), this measures what other activation grids would give on the same lowered
model, test metric in exact QDQ semantics (``tools/real_models.py``'s data and metric):

- ``qpasses``: the default (per-channel weights, the automatic fallback);
- ``per-channel conv outputs``: every activation quantizer on a Conv's output gets one grid per channel
  (min/max over the calibration samples, as the quantized model computes them). onnxruntime's integer
  Conv cannot run that (QLinearConv takes one output scale); it is an upper bound for rescaling the
  Conv's output channels into one grid and back;
- ``per-channel 4-D``: every quantizer of a 4-D (NCHW) tensor per channel (other ranks have no channel
  axis to trust: a sequence tensor's last axis may be time);
- ``learned scales``: the per-tensor activation scales learned end to end (straight-through rounding; Adam
  on the log-scales, minimising the outputs' relative squared error vs FP32 on the calibration samples,
  ``--steps`` steps of ``--batch`` samples). Needs torch (``pip install -e ".[learn]"``); a model with an op
  torch cannot run (slanet_plus's decoder Loop) says so.

Usage: ``python tools/bench/activation_headroom.py --models ppocr_rec slanet_plus [--steps 250]``
(after ``python tools/real_models.py fetch``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from qpasses.core import verification  # noqa: E402
from qpasses.data.sessions import with_outputs  # noqa: E402
from qpasses.quant.config import QuantConfig  # noqa: E402
from qpasses.quantize import quantize_model  # noqa: E402
from qpasses.runtime.tensor_sensitivity import activation_qdq_pairs  # noqa: E402


def _corpus() -> Any:
    spec = importlib.util.spec_from_file_location("real_models", ROOT / "tools" / "real_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_models"] = module
    spec.loader.exec_module(module)
    return module


def _scalar_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, list[onnx.NodeProto]]]:
    """Activation Q -> DQ pairs on one (scalar) integer grid."""
    inits = {t.name: t for t in model.graph.initializer}
    return [
        (q, dqs)
        for q, dqs in activation_qdq_pairs(model)
        if len(q.input) > 2
        and q.input[2] in inits
        and numpy_helper.to_array(inits[q.input[2]]).ndim == 0
        and numpy_helper.to_array(inits[q.input[2]]).dtype in (np.uint8, np.int8)
    ]


def _conv_output(model: onnx.ModelProto) -> Callable[[str], bool]:
    """Whether a tensor is a Conv's output (directly, or through the bias Add a folded export writes)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    constants = {t.name for t in model.graph.initializer}

    def check(name: str) -> bool:
        node = producers.get(name)
        if node is not None and node.op_type == "Add" and any(i in constants for i in node.input):
            node = producers.get(next(i for i in node.input if i not in constants))
        return node is not None and node.op_type == "Conv"

    return check


def per_channel_grids(
    model: onnx.ModelProto, calibration: Sequence[dict], chosen: Callable[[str], bool]
) -> onnx.ModelProto:
    """A copy of the lowered ``model`` whose chosen 4-D activation quantizers use one grid per channel
    (axis 1), each from that channel's min/max (zero included) on ``calibration``, exact semantics."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    pairs = [(q, dqs) for q, dqs in _scalar_pairs(out) if chosen(q.input[0])]
    names = [q.input[0] for q, _ in pairs]
    if not names:
        return out
    session = verification.exact_session(with_outputs(model, names))
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    for feed in calibration:
        for name, value in zip(names, session.run(names, dict(feed)), strict=True):
            if value.ndim != 4:
                low[name] = high[name] = np.empty(0)  # marks it: not 4-D
                continue
            lo, hi = value.min(axis=(0, 2, 3)), value.max(axis=(0, 2, 3))
            low[name] = lo if name not in low else np.minimum(low[name], lo)
            high[name] = hi if name not in high else np.maximum(high[name], hi)
    inits = {t.name: t for t in out.graph.initializer}
    for q, dqs in pairs:
        name = q.input[0]
        if low[name].size == 0:
            continue
        zero_point = numpy_helper.to_array(inits[q.input[2]])
        info = np.iinfo(zero_point.dtype)
        lo, hi = np.minimum(low[name], 0).astype(np.float64), np.maximum(high[name], 0).astype(np.float64)
        scale = np.maximum((hi - lo) / (info.max - info.min), 1e-12)
        zps = np.clip(np.round(info.min - lo / scale), info.min, info.max).astype(zero_point.dtype)
        out.graph.initializer.extend(
            [
                numpy_helper.from_array(scale.astype(np.float32), f"{name}__channel_scale"),
                numpy_helper.from_array(zps, f"{name}__channel_zero_point"),
            ]
        )
        for node in (q, *dqs):
            node.input[1], node.input[2] = f"{name}__channel_scale", f"{name}__channel_zero_point"
            node.attribute.append(onnx.helper.make_attribute("axis", 1))
    return out


def learned_scales(
    model: onnx.ModelProto, fp32: onnx.ModelProto, calibration: Sequence[dict], steps: int, batch: int, seed: int = 0
) -> onnx.ModelProto | str:
    """A copy of the lowered ``model`` with its per-tensor activation scales learned (module docstring);
    a string saying why when torch or its op mapping cannot run the model."""
    try:
        import torch
    except ImportError:
        return 'torch is not installed (pip install -e ".[learn]")'
    import graph_ir
    from qpasses.learned import torch_ops
    from qpasses.learned.torch_op_base import Unsupported

    def quantize(op: Any, args: list[Any], opset: int) -> Any:
        x, scale, zero = args[0], args[1], args[2]
        low, high = (0, 255) if zero.dtype == torch.uint8 else (-128, 127)
        v = x / scale
        return torch.clamp(v + (torch.round(v) - v).detach() + zero.to(torch.float32), low, high)

    def dequantize(op: Any, args: list[Any], opset: int) -> Any:
        q, scale, zero = args[0].to(torch.float32), args[1], args[2]
        axis = op.attr("axis", 1)
        if scale.ndim == 1 and scale.numel() > 1:  # per-channel weights
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return (q - zero.to(torch.float32)) * scale

    ops = {"QuantizeLinear": quantize, "DequantizeLinear": dequantize}
    saved = {k: torch_ops.OPS.get(k) for k in ops}
    torch_ops.OPS.update(ops)
    try:
        try:
            program = torch_ops.whole_graph(graph_ir.load(model))
        except Unsupported as exc:
            return f"torch cannot run it: {exc}"
        out = onnx.ModelProto()
        out.CopyFrom(model)
        inits = {t.name: t for t in out.graph.initializer}
        names = sorted({q.input[1] for q, _ in _scalar_pairs(out)})
        start = {n: torch.tensor(numpy_helper.to_array(inits[n]).astype(np.float32)) for n in names}
        logs = {n: torch.zeros((), requires_grad=True) for n in names}
        reference = verification.runtime_session(fp32)
        samples = [
            {k: v[i : i + 1] for k, v in feed.items()}
            for feed in calibration
            for i in range(len(next(iter(feed.values()))))
        ]
        targets = [[torch.tensor(o) for o in reference.run(None, s)] for s in samples]
        optimizer = torch.optim.Adam(list(logs.values()), lr=2e-3)
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            scales = {n: start[n] * torch.exp(logs[n]) for n in names}
            loss = torch.zeros(())
            for i in rng.choice(len(samples), min(batch, len(samples)), replace=False):
                got = program({k: torch.tensor(v) for k, v in samples[i].items()}, scales)
                for g, t in zip(got, targets[i], strict=True):
                    if g.dtype.is_floating_point:
                        loss = loss + ((g - t) ** 2).mean() / ((t**2).mean() + 1e-12)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for n in names:
            value = (start[n] * torch.exp(logs[n])).detach().numpy().astype(np.float32)
            inits[n].CopyFrom(numpy_helper.from_array(value, n))
        return out
    finally:
        for k, fn in saved.items():
            if fn is None:
                torch_ops.OPS.pop(k, None)
            else:
                torch_ops.OPS[k] = fn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["ppocr_rec", "slanet_plus"])
    ap.add_argument("--steps", type=int, default=250, help="learned scales: optimiser steps")
    ap.add_argument("--batch", type=int, default=4, help="learned scales: samples per step")
    args = ap.parse_args(argv)
    rm = _corpus()
    corpus = {m.name: m for m in rm.load_corpus()}
    print(f"{'model':14s} {'activation grids':28s} {'exact':>7s}")
    for name in args.models:
        model = corpus[name]
        calibration = model.calib_feeds()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = quantize_model(str(model.path), calibration, QuantConfig(per_channel=True), progress=False)
        lowered = result.model
        conv = _conv_output(lowered)
        rows: list[tuple[str, float | str]] = [
            ("qpasses default", model.evaluate(lowered.SerializeToString())),
            (
                "per-channel conv outputs",
                model.evaluate(per_channel_grids(lowered, calibration, conv).SerializeToString()),
            ),
            (
                "per-channel 4-D",
                model.evaluate(per_channel_grids(lowered, calibration, lambda _: True).SerializeToString()),
            ),
        ]
        assert result.reference is not None
        learned = learned_scales(lowered, result.reference, calibration, args.steps, args.batch)
        rows.append(
            ("learned scales", learned if isinstance(learned, str) else model.evaluate(learned.SerializeToString()))
        )
        for label, value in rows:
            print(f"{name:14s} {label:28s} {value if isinstance(value, str) else f'{value:7.4f}'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
