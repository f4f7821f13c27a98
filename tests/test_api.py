"""``qpasses.api``: the stable embedding API imports, is versioned and documented."""

from __future__ import annotations

import re
from pathlib import Path

import qpasses.api as api

ROOT = Path(__file__).resolve().parent.parent


def test_every_name_imports() -> None:
    assert len(set(api.__all__)) == len(api.__all__)
    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert not missing
    public = {n for n in vars(api) if not n.startswith("_")} - {"annotations", "TYPE_CHECKING", "Any"}
    assert public == set(api.__all__)  # nothing public by accident


def test_version_is_semver_major_minor() -> None:
    assert re.fullmatch(r"\d+\.\d+", api.API_VERSION)


def test_every_name_is_documented() -> None:
    doc = api.__doc__ or ""
    assert "API_VERSION" in doc and "Stable" in doc and "Internal" in doc
    undocumented = [n for n in api.__all__ if n != "API_VERSION" and f"``{n}``" not in doc]
    assert not undocumented


def test_readme_documents_the_api() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Embedding qpasses", 1)
    assert len(section) == 2, "README has no 'Embedding qpasses' section"
    text = section[1].split("\n## ", 1)[0]
    assert "qpasses.api" in text and f'API_VERSION = "{api.API_VERSION}"' in text
    assert "examples/embed_in_compiler.py" in text
    for stage in api.STAGES:
        assert f"`{stage}`" in text
    for name in ("from_onnx_ir", "to_onnx_ir", "quantize_onnx_ir", "from_graphsurgeon"):
        assert name in text


def test_pin_precision_is_honored() -> None:
    """The one annotation contract the API promises: a structural-stage pin survives annotation."""
    graph = api.load_model(ROOT / "models" / "digits_cnn.onnx")
    api.pin_precision(graph, "features.1.act_out", "int16")
    reg = api.default_registry()
    api.PassManager([reg.create_pass("annotate-precision")], verify="checker").run(graph)
    assert graph.tensors["features.1.act_out"].precision == api.Precision("int", 16)
    assert graph.tensors["features.1.act_out"].meta["encoding_bw"] == 16
    assert graph.tensors["features.3.act_out"].precision == api.Precision("int", 8)


def test_readme_pass_example_runs() -> None:
    """The "Writing a pass" example in the README is real code: it registers, runs and leaves its artifact."""
    import re
    from pathlib import Path

    from qpasses import api

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Writing a pass") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    scope: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), scope)
    registry = api.registry_with(scope["CountOps"])
    graph = api.load_model(Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx")
    ctx = api.PassContext()
    report = api.PassManager([registry.create_pass("count-ops")], verify="none").run(graph, ctx)
    counts = ctx.artifacts[scope["OpCounts"]].counts
    assert counts["Conv"] == sum(op.op_type == "Conv" for op in graph.ops) > 0
    assert report.records[0].analysis_seconds >= 0.0 and "ops" in report.format()
