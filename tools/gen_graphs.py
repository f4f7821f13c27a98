"""Generate very large but valid ONNX graphs for benchmarking passes.

Real models rarely exceed a few thousand nodes, so scaling problems (quadratic
lookups, recursion depth) only show up with synthetic graphs. The generator builds
protobufs in place from one pre-drawn numpy buffer, so a 100k-node model builds in
about 1-2 s. Note that onnxruntime session creation is super-linear in node count
(~10 s at 20k nodes, >10 min at 100k), so run big models through passes, not ORT.

Usage: ``python tools/gen_graphs.py 100000 out/chain_100k.onnx``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 8
SPATIAL = 8  # 8x8 feature maps keep inference cheap at any depth
RESIDUAL_EVERY = 4  # blocks between residual Adds


def _chain_size(num_blocks: int) -> int:
    """Nodes used by ``num_blocks`` blocks plus their residual Adds."""
    return 3 * num_blocks + max(num_blocks - 1, 0) // RESIDUAL_EVERY


def _num_blocks(num_nodes: int) -> int:
    """Largest block count whose nodes fit in ``num_nodes``; the rest is Relu padding."""
    blocks = num_nodes * RESIDUAL_EVERY // (3 * RESIDUAL_EVERY + 1) + 1
    while blocks > 0 and _chain_size(blocks) > num_nodes:
        blocks -= 1
    return blocks


def conv_bn_relu_chain(num_nodes: int, channels: int = 8, seed: int = 0, *, kernel: int = 3) -> onnx.ModelProto:
    """A chain of Conv->BatchNormalization->Relu blocks with a residual Add every few blocks.

    Exactly ``num_nodes`` nodes (the tail is padded with up to 3 Relus). Input and
    output are ``[N, channels, 8, 8]`` float32; ``kernel`` must be odd ("same" padding).
    Weights are scaled so the branches contract and the residual path carries the
    signal, keeping activations finite however long the chain is.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    if channels < 1 or kernel < 1 or kernel % 2 == 0:
        raise ValueError("channels must be >= 1 and kernel a positive odd number")

    num_blocks = _num_blocks(num_nodes)
    rng = np.random.default_rng(seed)
    fan_in = channels * kernel * kernel
    w_size = channels * fan_in
    # One draw for all parameters; each tensor's raw_data is a slice of one buffer.
    conv_w = rng.standard_normal((num_blocks, w_size), dtype=np.float32) * np.float32(0.5 / np.sqrt(fan_in))
    vecs = rng.standard_normal((num_blocks, 5, channels), dtype=np.float32) * np.float32(0.1)
    vecs[:, 1] += 0.25  # small BN scale: each branch contracts, so depth cannot blow up
    vecs[:, 4] = 1.0 + np.abs(vecs[:, 4])  # BN variance positive
    pad = kernel // 2

    model = onnx.ModelProto(ir_version=IR_VERSION, producer_name="qpasses-gen-graphs")
    model.opset_import.add(domain="", version=OPSET)
    graph = model.graph
    graph.name = f"conv_bn_relu_chain_{num_nodes}"
    # Build every message in place with .add(): constructing standalone protos and
    # extending copies each one, which dominates the runtime at 100k nodes.
    add_node, add_init = graph.node.add, graph.initializer.add
    conv_attrs = [
        helper.make_attribute("kernel_shape", [kernel, kernel]),
        helper.make_attribute("pads", [pad] * 4),
    ]
    eps_attr = [helper.make_attribute("epsilon", 1e-5)]
    f32 = TensorProto.FLOAT
    vec_dims = [channels]
    w_dims = [channels, channels, kernel, kernel]
    w_bytes = conv_w.tobytes()
    vec_bytes = vecs.tobytes()
    w_len, v_len = w_size * 4, channels * 4
    suffixes = (".b", ".scale", ".bias", ".mean", ".var")

    x = skip = "input"
    for b in range(num_blocks):
        p = f"b{b}"
        add_init(name=f"{p}.w", data_type=f32, dims=w_dims, raw_data=w_bytes[b * w_len : (b + 1) * w_len])
        base = b * 5 * v_len
        for k, suffix in enumerate(suffixes):
            off = base + k * v_len
            add_init(name=p + suffix, data_type=f32, dims=vec_dims, raw_data=vec_bytes[off : off + v_len])
        add_node(
            op_type="Conv", input=[x, f"{p}.w", f"{p}.b"], output=[f"{p}.conv"], name=f"{p}/Conv", attribute=conv_attrs
        )
        add_node(
            op_type="BatchNormalization",
            input=[f"{p}.conv", f"{p}.scale", f"{p}.bias", f"{p}.mean", f"{p}.var"],
            output=[f"{p}.bn"],
            name=f"{p}/BatchNormalization",
            attribute=eps_attr,
        )
        add_node(op_type="Relu", input=[f"{p}.bn"], output=[f"{p}.relu"], name=f"{p}/Relu")
        x = f"{p}.relu"
        if (b + 1) % RESIDUAL_EVERY == 0 and b + 1 < num_blocks:
            add_node(op_type="Add", input=[x, skip], output=[f"{p}.add"], name=f"{p}/Add")
            x = skip = f"{p}.add"
    for i in range(num_nodes - len(graph.node)):
        add_node(op_type="Relu", input=[x], output=[f"pad{i}"], name=f"pad{i}/Relu")
        x = f"pad{i}"

    shape = ["N", channels, SPATIAL, SPATIAL]
    graph.input.append(helper.make_tensor_value_info("input", f32, shape))
    graph.output.append(helper.make_tensor_value_info(x, f32, shape))
    return model


def main(argv: list[str] | None = None) -> int:
    """CLI: write a chain model of N nodes to a path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("num_nodes", type=int, help="number of nodes in the graph")
    parser.add_argument("output", type=Path, help="where to write the .onnx file")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--kernel", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--external-data", action="store_true", help="store weights in <output>.data next to the model")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = conv_bn_relu_chain(args.num_nodes, args.channels, args.seed, kernel=args.kernel)
    built = time.perf_counter()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.external_data:
        onnx.save(
            model,
            str(args.output),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=args.output.name + ".data",
        )
    else:
        onnx.save(model, str(args.output))
    print(
        f"{args.output}: {len(model.graph.node)} nodes, "
        f"{len(model.graph.initializer)} initializers; built in {built - start:.2f}s, "
        f"saved in {time.perf_counter() - built:.2f}s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
