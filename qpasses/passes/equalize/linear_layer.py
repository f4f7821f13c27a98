"""A Conv/ConvTranspose/Gemm/MatMul seen as a per-output-channel linear layer: its weight and bias by
channel, scaled or shifted in place (what batch-norm folding, CLE and bias-add folding edit)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graph_ir import Graph, Op
from qpasses.core.analyses import Shapes

LAYER_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class LayerError(ValueError):
    """Why an op cannot be viewed as a per-channel linear layer."""


def per_channel(array: np.ndarray, channels: int) -> np.ndarray | None:
    """``array`` as a [channels] vector if it broadcasts along the last axis only, else None."""
    if array.ndim == 0:
        return np.full(channels, array, dtype=np.float64)
    if any(d != 1 for d in array.shape[:-1]) or array.shape[-1] not in (1, channels):
        return None
    return np.broadcast_to(array.reshape(-1).astype(np.float64), (channels,)).copy()


def _const(graph: Graph, name: str, what: str) -> np.ndarray:
    if not name:
        raise LayerError(f"{what} is missing")
    t = graph.tensors.get(name)
    data = t.data if t is not None and t.is_constant else None
    if data is None:
        raise LayerError(f"{what} {name} is not a constant")
    if not np.issubdtype(data.dtype, np.floating):
        raise LayerError(f"{what} {name} is {data.dtype}, not floating point")
    return data


def matmul_bias_problem(graph: Graph, add: Op) -> str | None:
    """None when ``add`` adds a constant per-channel bias to a MatMul with a constant weight."""
    if add.op_type != "Add" or len(add.inputs) != 2:
        return f"'{add.name}' is not a binary Add"
    for data, const in (add.inputs, add.inputs[::-1]):
        mm = graph.producer(data)
        t = graph.tensors.get(const)
        if mm is None or mm.op_type != "MatMul" or t is None or not t.is_constant:
            continue
        w = graph.tensors.get(mm.inputs[1])
        if w is None or not w.is_constant or w.shape is None or len(w.shape) != 2:
            return f"MatMul '{mm.name}' has no constant 2-D weight"
        shape = t.shape or ()
        if any(d != 1 for d in shape[:-1]) or (shape and shape[-1] not in (1, w.shape[1])):
            return f"Add '{add.name}' constant of shape {list(shape)} is not a per-channel bias"
        return None
    return f"'{add.name}' is not a constant bias added to a MatMul"


def bias_add_of(graph: Graph, mm: Op) -> Op | None:
    """The Add that adds a per-channel constant bias to ``mm``'s output, if it alone reads it."""
    out = mm.outputs[0]
    uses = graph.uses(out)
    if len(uses) != 1 or graph.is_graph_output(out):
        return None
    add = uses[0][0]
    return add if add.op_type == "Add" and matmul_bias_problem(graph, add) is None else None


@dataclass
class LinearLayer:
    """A Conv / ConvTranspose / Gemm / MatMul with constant weights, as ``y = W x + b`` per channel.

    Edits happen on float64 working copies; ``commit`` writes them back in the original
    dtype, copying weights that other ops (or the model interface) share.
    """

    graph: Graph
    op: Op
    weight: np.ndarray  # canonical [group, out/group, in/group, taps], float64
    bias: np.ndarray  # [out], float64; zeros when the op has none
    has_bias: bool
    dtype: np.dtype
    weight_shape: tuple[int, ...]
    bias_add: Op | None = None
    input_rank: int | None = None
    # BatchNorm (gamma, beta) describing this layer's output, scaled along with it.
    stats: tuple[np.ndarray, np.ndarray] | None = None
    weight_dirty: bool = False
    bias_dirty: bool = False

    # --- construction -----------------------------------------------------------------
    @classmethod
    def load(cls, graph: Graph, op: Op, shapes: Shapes | None = None) -> LinearLayer:
        if op.op_type not in LAYER_TYPES or not op.is_standard:
            raise LayerError(f"{op.op_type} '{op.name}' is not Conv/ConvTranspose/Gemm/MatMul")
        if len(op.inputs) < 2:
            raise LayerError(f"'{op.name}' has no weight input")
        w = _const(graph, op.inputs[1], "weight")
        bias_name = op.inputs[2] if len(op.inputs) > 2 else ""
        bias_add = None
        if op.op_type in ("Conv", "ConvTranspose"):
            if w.ndim < 3:
                raise LayerError(f"'{op.name}' weight has rank {w.ndim}")
            g = int(op.attr("group", 1))
            if w.shape[0] % g:
                raise LayerError(f"'{op.name}' weight dim 0 ({w.shape[0]}) is not a multiple of group {g}")
            taps = w.reshape(g, w.shape[0] // g, w.shape[1], -1)  # [g, dim0/g, dim1, taps]
            canon = taps if op.op_type == "Conv" else taps.transpose(0, 2, 1, 3)  # ConvT: [in, out/g, ...]
            out_ch = canon.shape[0] * canon.shape[1]
        else:
            if w.ndim != 2:
                raise LayerError(f"'{op.name}' weight has rank {w.ndim}, not 2")
            trans_b = op.op_type == "Gemm" and int(op.attr("transB", 0)) == 1
            nk = w if trans_b else w.T  # [out, in]
            canon = nk.reshape(1, nk.shape[0], nk.shape[1], 1)
            out_ch = nk.shape[0]
        bias = np.zeros(out_ch, np.float64)
        has_bias = False
        if op.op_type == "MatMul":
            bias_add = bias_add_of(graph, op)
            if bias_add is not None:
                const = next(n for n in bias_add.inputs if graph.tensors[n].is_constant)
                found = per_channel(_const(graph, const, "bias"), out_ch)
                if found is None:  # bias_add_of checked the shape: cannot happen
                    raise LayerError(f"Add '{bias_add.name}' does not add a per-channel bias")
                bias, has_bias = found, True
        elif bias_name:
            b = _const(graph, bias_name, "bias")
            scale = float(op.attr("beta", 1.0)) if op.op_type == "Gemm" else 1.0
            vec = (
                per_channel(b, out_ch)
                if op.op_type == "Gemm"
                else (b.astype(np.float64) if b.shape == (out_ch,) else None)
            )
            if vec is None:
                raise LayerError(f"'{op.name}' bias of shape {list(b.shape)} is not per output channel")
            bias, has_bias = vec * scale, True
        rank = None
        if shapes is not None:
            shape = shapes.shape(op.inputs[0])
            rank = None if shape is None else len(shape)
        return cls(graph, op, canon.astype(np.float64), bias, has_bias, w.dtype, tuple(w.shape), bias_add, rank)

    # --- geometry -----------------------------------------------------------------------
    @property
    def groups(self) -> int:
        return self.weight.shape[0]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0] * self.weight.shape[1]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[0] * self.weight.shape[2]

    @property
    def is_depthwise(self) -> bool:
        """One input and one output channel per group: output channel i only sees input channel i."""
        return self.op.op_type in ("Conv", "ConvTranspose") and self.weight.shape[1] == self.weight.shape[2] == 1

    @property
    def channels_first(self) -> bool:
        """Conv outputs carry channels on axis 1; Gemm/MatMul on the last axis."""
        return self.op.op_type in ("Conv", "ConvTranspose")

    @property
    def output(self) -> str:
        return (self.bias_add or self.op).outputs[0]

    @property
    def pads_input(self) -> bool:
        """True when some outputs see fewer than all kernel taps (zero padding, transposed conv)."""
        if self.op.op_type == "ConvTranspose":
            return True
        if self.op.op_type != "Conv":
            return False
        auto = self.op.attr("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        return auto in ("SAME_UPPER", "SAME_LOWER") or any(int(p) for p in self.op.attr("pads", []) or [])

    # --- per-channel math -----------------------------------------------------------------
    def out_ranges(self) -> np.ndarray:
        return np.abs(self.weight).max(axis=(2, 3)).reshape(-1)

    def in_ranges(self) -> np.ndarray:
        return np.abs(self.weight).max(axis=(1, 3)).reshape(-1)

    def scale_out(self, factor: np.ndarray) -> None:
        """Multiply output channel i (weights, bias and output statistics) by factor[i] > 0."""
        self.weight *= factor.reshape(self.groups, -1, 1, 1)
        self.bias = self.bias * factor
        if self.stats is not None:
            self.stats = (self.stats[0] * factor, self.stats[1] * factor)
        self.weight_dirty = self.bias_dirty = True

    def scale_in(self, factor: np.ndarray) -> None:
        """Multiply the weights reading input channel i by factor[i]."""
        self.weight *= factor.reshape(self.groups, 1, -1, 1)
        self.weight_dirty = True

    def response(self, shift: np.ndarray) -> np.ndarray:
        """Per output channel: what a constant per-input-channel ``shift`` adds (all taps)."""
        g, _, cin_g, _ = self.weight.shape
        return np.einsum("goik,gi->go", self.weight, shift.reshape(g, cin_g)).reshape(-1)

    def add_bias(self, delta: np.ndarray) -> None:
        self.bias = self.bias + delta
        self.has_bias = True
        self.bias_dirty = True

    # --- write back -------------------------------------------------------------------------
    def commit(self) -> None:
        """Write edited weight/bias into the graph (creating a bias where there was none)."""
        if self.weight_dirty:
            self._write(self.op, 1, self._weight_array())
            self.weight_dirty = False
        if self.bias_dirty:
            self._commit_bias()
            self.bias_dirty = False

    def _weight_array(self) -> np.ndarray:
        w = self.weight
        arr: np.ndarray
        if self.op.op_type == "Conv":
            arr = w.reshape(self.weight_shape)
        elif self.op.op_type == "ConvTranspose":
            arr = w.transpose(0, 2, 1, 3).reshape(self.weight_shape)
        else:
            nk = w.reshape(w.shape[1], w.shape[2])
            arr = nk if self.op.op_type == "Gemm" and int(self.op.attr("transB", 0)) == 1 else nk.T
        return arr.astype(self.dtype)

    def _commit_bias(self) -> None:
        graph, op = self.graph, self.op
        bias = self.bias.astype(self.dtype)
        if self.bias_add is not None:
            slot = next(i for i, n in enumerate(self.bias_add.inputs) if graph.tensors[n].is_constant)
            old = graph.tensors[self.bias_add.inputs[slot]].shape or ()
            self._write(self.bias_add, slot, bias.reshape((1,) * (max(len(old), 1) - 1) + (-1,)))
            return
        if op.op_type == "MatMul":
            self._attach_matmul_bias(bias)
            return
        if op.op_type == "Gemm" and float(op.attr("beta", 1.0)) != 1.0:
            op.set_attr("beta", 1.0)
            graph.touch()
        if len(op.inputs) > 2 and op.inputs[2]:
            self._write(op, 2, bias)
        else:
            name = graph.unique_name(f"{op.name}.bias")
            graph.add_initializer(name, bias)
            graph.set_input(op, 2, name)

    def _attach_matmul_bias(self, bias: np.ndarray) -> None:
        """MatMul has no bias slot: become a Gemm when the input is 2-D, else add an Add."""
        graph, op = self.graph, self.op
        name = graph.unique_name(f"{op.name}.bias")
        graph.add_initializer(name, bias)
        rank = self.input_rank
        if rank is None and (shape := graph.tensors[op.inputs[0]].shape) is not None:
            rank = len(shape)
        if rank == 2:  # Gemm's defaults (no transposes, alpha = beta = 1) are MatMul + bias
            graph.set_op_type(op, "Gemm")
            graph.set_input(op, 2, name)
            return
        out = op.outputs[0]
        if not graph.is_graph_output(out):
            self.bias_add = graph.insert_op_on_edge(out, "Add", extra_inputs=[name], name=f"{op.name}_bias")
            return
        inner = graph.unique_name(f"{out}_matmul")
        graph.set_output(op, 0, inner)
        self.bias_add = graph.add_op("Add", [inner, name], [out], name=f"{op.name}_bias")

    def _write(self, op: Op, slot: int, array: np.ndarray) -> None:
        """Store ``array`` as ``op``'s input ``slot``; copy first if anything else reads that tensor.

        A weight only this op reads that is also listed as a graph input (IR < 4 exporters list every
        initializer as one) is rewritten in place and stops being an input: the default a caller could
        feed would mean something else now, and a copy under a new name would leave the input unread
        while an override naming the weight missed the rewritten one.
        """
        graph = self.graph
        name = op.inputs[slot]
        if len(graph.uses(name)) == 1 and not graph.is_graph_output(name):
            release_initializer_input(graph, name)
        shared = len(graph.uses(name)) > 1 or name in graph.inputs or graph.is_graph_output(name)
        if shared:
            name = graph.unique_name(f"{name}_{op.name}")
            graph.add_initializer(name, array)
            graph.set_input(op, slot, name)
        else:
            graph.tensors[name].set_data(array)

    def take_output(self, name: str) -> None:
        """Make the layer's last op write ``name`` (an unproduced tensor, e.g. a graph output)."""
        self.graph.set_output(self.bias_add or self.op, 0, name)


def release_initializer_input(graph: Graph, name: str) -> bool:
    """Stop listing an initializer as a graph input (IR < 4 style); False if ``name`` is not one."""
    t = graph.tensors.get(name)
    if t is None or t.initializer is None or name not in graph.inputs:
        return False
    graph.inputs.remove(name)
    graph.touch()
    return True


def drop_if_unused(graph: Graph, names: list[str]) -> None:
    """Delete weights nothing reads any more (initializers, also those listed as graph inputs, or their
    Constant nodes)."""
    for name in names:
        if name and not graph.uses(name) and not graph.is_graph_output(name):
            release_initializer_input(graph, name)
        t = graph.tensors.get(name)
        if not name or t is None or graph.uses(name) or name in graph.inputs or graph.is_graph_output(name):
            continue
        producer = graph.producer(name)
        if producer is not None and producer.op_type == "Constant" and len(producer.outputs) == 1:
            graph.remove_op(producer)
        elif producer is None and t.initializer is not None:
            graph.remove_tensor(name)
