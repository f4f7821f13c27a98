"""Run a user's Python rewrite script as a pass.

The script defines ``rewrite(graph)``. By default ``graph`` is an
``onnx_graphsurgeon.Graph`` (so existing graphsurgeon code runs unchanged); a script
that sets ``REWRITE_API = "ir"`` receives the qpasses IR ``graph_ir.Graph`` instead. The
function edits the graph in place or returns a new one.
"""

from __future__ import annotations

import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graph_ir import Graph
from graph_ir.graphsurgeon_bridge import from_graphsurgeon, to_graphsurgeon
from qpasses.core.context import PassContext
from qpasses.core.errors import PassError
from qpasses.core.pass_base import Pass, PassResult


class RewriteScript(Pass):
    name = "rewrite-script"
    modifies_values = True  # whatever the script edits: statistics measured before do not hold after
    description = "run rewrite(graph) from a Python file (onnx-graphsurgeon graph, or IR with REWRITE_API='ir')"

    @dataclass
    class Options:
        path: str = ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if not self.options.path:
            raise PassError("pass 'rewrite-script' needs its script: rewrite-script{path=FILE.py} or --script FILE")
        path = Path(self.options.path)
        if not path.is_file():
            raise PassError(f"rewrite script not found: {path}")
        try:
            namespace = runpy.run_path(str(path))
        except Exception as exc:
            raise PassError(f"rewrite script {path} failed to load: {type(exc).__name__}: {exc}") from exc
        rewrite = namespace.get("rewrite")
        if not callable(rewrite):
            raise PassError(f"rewrite script {path} does not define rewrite(graph)")
        api = namespace.get("REWRITE_API", "graphsurgeon")
        if api not in ("ir", "graphsurgeon"):
            raise PassError(f"rewrite script {path}: REWRITE_API must be 'graphsurgeon' or 'ir', not {api!r}")
        if api == "ir":
            before = graph.version
            returned = _call(rewrite, graph, path)
            if isinstance(returned, Graph) and returned is not graph:
                graph.adopt(returned)
            modified = graph.version != before
        else:
            # graphsurgeon carries no annotations: keep them by tensor name across the round trip.
            annotations = {
                name: (t.encoding, t.precision, dict(t.meta))
                for name, t in graph.tensors.items()
                if t.encoding is not None or t.precision is not None or t.meta
            }
            gs_graph = to_graphsurgeon(graph)
            returned = _call(rewrite, gs_graph, path)
            graph.adopt(from_graphsurgeon(returned if returned is not None else gs_graph, template=graph))
            for name, (encoding, precision, meta) in annotations.items():
                t = graph.tensors.get(name)
                if t is not None:
                    t.encoding, t.precision, t.meta = encoding, precision, meta
            modified = True
        self.remarks.applied(f"ran rewrite script {path.name} ({api} API)")
        return self.result(modified)


def _call(rewrite: Any, graph: Any, path: Path) -> Any:
    """The user's function: what it raises is the script's error (exit 2), not a qpasses bug."""
    try:
        return rewrite(graph)
    except Exception as exc:  # noqa: BLE001 - anything the user's code raises
        raise PassError(f"rewrite script {path} raised {type(exc).__name__}: {exc}") from exc
