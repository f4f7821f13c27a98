"""Apply a user's encodings file (QNN ``--quantization_overrides``) to the IR tensors.

Overridden tensors are marked ``meta["encoding_source"] = "override"`` so calibration and
weight encoding keep them; everything else is computed as usual (partial overrides). An
encoding given for a data-movement output goes to the tensor it shares its encoding with.

The quantization plan reads precisions (a float32 weight gets no encoding), so when a precision
override changes one the graph is touched: the cached ``QuantPlan`` is recomputed by the next pass
that asks for it, while the structural analyses are declared preserved. Range overrides alone do
not change the plan and leave the cache as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from graph_ir import Graph
from qpasses.core.analyses import ConstantData, Shapes, TopologicalOrder
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError
from qpasses.core.pass_base import Pass, PassResult
from qpasses.quant import encodings_io
from qpasses.quant.encodings import Encoding
from qpasses.quant.encodings_file import EncodingsFile, PrecisionOverride, TensorSpec
from qpasses.quant.plan import QuantPlan, weight_axes
from qpasses.quant.precision_type import Precision, tensor_precision


def tensor_specs(graph: Graph) -> dict[str, TensorSpec]:
    """What an overrides file may name: activations, weights (with channel counts), biases, params."""
    specs: dict[str, TensorSpec] = {}
    for op in graph.ops:
        for name in op.outputs:
            if name:
                specs[name] = TensorSpec("activation")
    for name in graph.inputs:
        if not graph.tensors[name].is_constant:  # an initializer listed as input (IR < 4) is a constant
            specs[name] = TensorSpec("activation")
    axes = weight_axes(graph)
    for op in graph.ops:
        for slot, name in enumerate(op.inputs):
            if not name or not graph.tensors[name].is_constant:
                continue
            shape = graph.tensors[name].static_shape or ()  # a constant's dims are all known ints
            if name in axes:
                axis = axes[name]
                specs[name] = (
                    TensorSpec("weight", per_channel=False) if axis is None else TensorSpec("weight", shape[axis], axis)
                )
            elif op.op_type in ("Conv", "ConvTranspose", "Gemm") and slot == 2 and len(shape) == 1:
                specs[name] = TensorSpec("bias", shape[0], 0)
            elif name not in specs:
                specs[name] = TensorSpec("weight")
    return specs


def load_overrides(path: str, graph: Graph) -> EncodingsFile:
    return encodings_io.load(path, tensors=tensor_specs(graph))


@dataclass
class Overrides:
    """Artifact: an encodings/overrides file already read (``path``: where from, None for an object
    built in memory); ``apply-overrides`` applies it instead of reading ``path`` again."""

    file: EncodingsFile
    path: str | None = None


class ApplyOverrides(Pass):
    name = "apply-overrides"
    description = "apply an encodings/overrides JSON file (AIMET 0.6.1 or 1.0.0 layout)"
    uses = (QuantPlan,)
    # Precision overrides change what QuantPlan computes (not the graph's structure): it is left out.
    preserves = (TopologicalOrder, Shapes, ConstantData)

    @dataclass
    class Options:
        path: str = ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        given = ctx.artifacts.get(Overrides)
        if given is None or (self.options.path and self.options.path != given.path):
            if not self.options.path:
                raise PassError(
                    "pass 'apply-overrides' needs its file: apply-overrides{path=FILE.json}, or an "
                    "Overrides artifact (an encodings file object) in the context"
                )
            overrides = load_overrides(self.options.path, graph)
        else:
            overrides = given.file
        plan = ctx.get(QuantPlan, graph).plan
        applied = 0
        precisions_changed = False
        for name, entry in [*overrides.activations.items(), *overrides.params.items()]:
            t = graph.tensors.get(name)
            if t is None:
                self.remarks.missed(
                    "override not applied",
                    [name],
                    reason="tensor no longer exists (removed by an earlier pass such as fold-batchnorm)",
                )
                continue
            if isinstance(entry, PrecisionOverride):
                precisions_changed |= tensor_precision(t) != Precision.of(entry)
                t.precision = entry
                t.meta["precision_source"] = "override"
                applied += 1
                continue
            assert isinstance(entry, Encoding)
            if name in plan.shared:
                root = plan.shared[name]
                if root in overrides.activations or graph.tensors[root].meta.get("encoding_source") == "override":
                    self.remarks.missed(
                        "override ignored",
                        [name],
                        reason=f"data-movement output shares the encoding of {root}, which has one",
                    )
                    continue
                # As qairt-converter does: the encoding propagates across data-invariant ops to the tensor it shares.
                graph.tensors[root].encoding = entry
                graph.tensors[root].meta.update(encoding_source="override", encoding_propagated_from=name)
                self.remarks.applied("override propagated across data-invariant ops", [name], reason=f"to {root}")
                applied += 1
                continue
            t.encoding = entry
            t.meta["encoding_source"] = "override"
            applied += 1
        self.remarks.applied(f"applied {applied} overrides")
        return self.result(applied > 0)
