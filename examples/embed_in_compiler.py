"""Embedding qpasses in an onnxscript/onnx_ir-based compiler, in four steps.

1. a custom pass (a compiler's own rule: the first and last compute layers keep 16-bit activations);
2. registered, and inserted at an extension point of the default pipeline (``structural``: before
   precisions are annotated, so the annotation honors the pin);
3. quantization run on an ``onnx_ir.Model`` through the bridge;
4. the encodings read back as data, from the result and from the ``onnx_ir`` values themselves.

    python examples/embed_in_compiler.py        # needs: pip install -e ".[onnx-ir]"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qpasses import api

ROOT = Path(__file__).resolve().parent.parent
COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class FirstLastInt16(api.Pass):
    """Pin the activations of the first and last compute layers to ``precision``."""

    name = "first-last-int16"
    description = "keep the first and last compute layers' outputs at 16 bits"

    @dataclass
    class Options:
        precision: str = "int16"

    def run(self, graph: api.Graph, ctx: api.PassContext) -> api.PassResult:
        layers = [op for op in graph.topological_order() if op.op_type in COMPUTE]
        if not layers:
            self.remarks.missed("no compute layer to pin")
            return self.result(False)
        pinned = list(dict.fromkeys([layers[0].outputs[0], layers[-1].outputs[0]]))
        for name in pinned:
            api.pin_precision(graph, name, self.options.precision)
        self.remarks.applied(
            f"pinned {', '.join(pinned)} to {self.options.precision}", [layers[0].name, layers[-1].name]
        )
        return self.result(True)


def main() -> None:
    config = api.QuantConfig(per_channel=True)
    extensions = {"structural": [api.PassSpec("first-last-int16")]}
    print(f"qpasses API {api.API_VERSION}; pipeline with the extension:")
    print("  " + api.build_quantize_pipeline(config, extensions=extensions).text())

    model = ir.load(ROOT / "models" / "digits_cnn.onnx")  # what an onnxscript compiler holds
    qmodel, encodings = api.quantize_onnx_ir(
        model,
        str(ROOT / "models" / "digits_calib.npz"),
        config,
        registry=api.registry_with(FirstLastInt16),
        extensions=extensions,
        progress=False,
    )

    print("activation encodings (name: bitwidth, scale, offset):")
    for name, enc in encodings.activations.items():
        print(f"  {name}: {enc.bitwidth} bits, scale {enc.scale[0]:.6g}, offset {enc.offset[0]}")
    print(f"{len(encodings.params)} weight/bias encodings, e.g.:")
    for name, enc in list(encodings.params.items())[:2]:
        print(f"  {name}: {enc.bitwidth} bits, {len(enc.scale)} channel scales from {min(enc.scale):.3g}")

    # The custom pass's effect, as data: 16-bit encodings exactly where it pinned, 8 bits elsewhere.
    sixteen = {name for name, enc in encodings.activations.items() if enc.bitwidth == 16}
    eight = {name for name, enc in encodings.activations.items() if enc.bitwidth == 8}
    assert sixteen and eight and len(sixteen) + len(eight) == len(encodings.activations), encodings.activations
    assert sixteen == {"features.0.act_out", "logits"}, sorted(sixteen)  # first conv (+ its Relu), last Gemm

    # The encodings also ride on the onnx_ir values that own one (meta: objects; metadata_props: the
    # JSON ir.save writes); a data-movement output (Flatten...) shares its input's and carries none.
    values = {v.name: v for node in qmodel.graph for v in node.outputs}
    values.update({v.name: v for v in qmodel.graph.inputs})
    owners = {name for name, v in values.items() if api.ENCODING_KEY in v.meta and name in encodings.activations}
    assert {"input", "features.0.act_out"} <= owners, sorted(owners)
    for name in owners:
        assert values[name].meta[api.ENCODING_KEY] == encodings.activations[name], name
    shown = values["features.0.act_out"].metadata_props[api.ENCODING_KEY]
    print(f"metadata_props[{api.ENCODING_KEY!r}] of features.0.act_out: {shown}")

    # The QDQ model runs: top-1 agreement with the FP32 model on the shipped test split.
    test = np.load(ROOT / "models" / "digits_test.npz")
    feed = {"input": test["input"][:256]}
    fp32 = ort.InferenceSession(str(ROOT / "models" / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    qdq = ort.InferenceSession(ir.to_proto(qmodel).SerializeToString(), providers=["CPUExecutionProvider"])
    agree = float(np.mean(fp32.run(None, feed)[0].argmax(1) == qdq.run(None, feed)[0].argmax(1)))
    print(f"top-1 agreement with FP32 on {len(feed['input'])} test digits: {agree:.3f}")
    assert agree > 0.9, agree


if __name__ == "__main__":
    main()
