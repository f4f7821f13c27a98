"""The ``qpasses`` command. User errors print one line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from qpasses.core.errors import QPassesError

EXIT_USER_ERROR = 2
EXIT_FINDINGS = 1  # `check`: the model has ops the target cannot run, or the runtime diverges
EXIT_INTERNAL_ERROR = 1  # a bug in qpasses


def _cmd_run(args: argparse.Namespace) -> int:
    import graph_ir
    from qpasses.core.context import PassContext
    from qpasses.core.pass_manager import DumpAfter, PassManager
    from qpasses.core.pipeline import build_passes, load_pipeline_file, parse_pipeline
    from qpasses.passes import default_registry

    _check_output_path(args.model, args.output)
    registry = default_registry()
    specs = load_pipeline_file(args.pipeline_file) if args.pipeline_file else parse_pipeline(args.pipeline or "")
    passes = build_passes(specs, registry)
    if args.script:
        passes.append(registry.create_pass("rewrite-script", path=args.script))
    graph = graph_ir.load(args.model)
    instrumentations = []
    if args.dump_after:
        unknown = sorted(set(args.dump_after) - {p.name for p in passes} - {"all"})
        if unknown:
            raise QPassesError(
                f"--dump-after {', '.join(unknown)}: not in the pipeline "
                f"({', '.join(p.name for p in passes) or 'empty'})"
            )
        dump_dir = Path(args.dump_dir or Path(args.output).with_suffix("").as_posix() + ".dumps")
        names = () if args.dump_after == ["all"] else tuple(args.dump_after)
        instrumentations.append(DumpAfter(dump_dir, names))
    pm = PassManager(passes, verify=args.verify, fixed_point=args.fixed_point, instrumentations=instrumentations)
    from qpasses.targets.resolve import resolve_target

    ctx = PassContext(calibration_data=args.calib, target=resolve_target(args.target, registry))
    report = pm.run(graph, ctx)
    graph_ir.save(graph, args.output)
    if report.records:
        print(report.format())
    print(f"wrote {args.output} ({len(graph)} ops)")
    return 0


def default_calibration(model: str) -> Path | None:
    """Shipped models carry their calibration split beside them: <stem>_calib.npz or <prefix>_calib.npz."""
    path = Path(model)
    stem = path.stem
    for name in (f"{stem}_calib.npz", f"{stem.split('_')[0]}_calib.npz"):
        if (path.parent / name).is_file():
            return path.parent / name
    return None


def _cmd_quantize(args: argparse.Namespace) -> int:
    from qpasses.quant.config import QuantConfig
    from qpasses.quantize import quantize_model

    if not Path(args.model).is_file():
        raise QPassesError(f"model file not found: {args.model}")
    if args.no_calib and args.calib is not None:
        raise QPassesError("--no-calib and --calib contradict each other: give one")
    _check_output_dir(args.model, args.output)
    config = QuantConfig(
        act_bw=args.act_bw,
        weight_bw=args.weight_bw,
        bias_bw=args.bias_bw,
        per_channel=args.per_channel,
        act_mode=args.act_mode,
        weight_mode=args.weight_mode,
        float_bw=args.float_bw,
        float_bias_bw=args.float_bias_bw,
    )
    calib = args.calib
    # As in the spec, --float-bw without calibration data asks for a non-quantized (float) model.
    if calib is None and not args.no_calib and args.float_bw is None:
        found = default_calibration(args.model)
        if found is None:
            raise QPassesError(
                f"no --calib given and no shipped calibration data beside {args.model} "
                "(pass --calib DATA, or --no-calib to quantize weights only)"
            )
        calib = str(found)
        print(f"using calibration data {calib}", file=sys.stderr if args.print_pipeline else sys.stdout)
    pipeline = args.pipeline
    if args.pipeline_file:
        from qpasses.core.pipeline import load_pipeline_file

        pipeline = load_pipeline_file(args.pipeline_file)
    seq_mse_options = {
        key: value
        for key, value in (
            ("num_candidates", args.seq_mse_candidates),
            ("num_batches", args.seq_mse_batches),
            ("loss_fn", args.seq_mse_loss),
            ("inp_symmetry", args.seq_mse_symmetry),
            ("exclude", args.seq_mse_exclude),
        )
        if value is not None
    }
    if seq_mse_options and not args.seq_mse:
        raise QPassesError(f"--seq-mse-* options ({', '.join(seq_mse_options)}) need --seq-mse")
    learned = {
        "adaround": args.adaround,
        "adaround_options": {
            key: value
            for key, value in (
                ("iterations", args.adaround_iterations),
                ("num_batches", args.adaround_batches),
                ("input_from", args.adaround_inputs),
                ("exclude", args.adaround_exclude),
            )
            if value is not None
        },
        "adascale": args.adascale,
        "adascale_options": {
            key: value
            for key, value in (
                ("num_epochs", args.adascale_epochs),
                ("num_batches", args.adascale_batches),
                ("blocks", args.adascale_block),
                ("exclude", args.adascale_exclude),
            )
            if value is not None
        },
    }
    for flag in ("adaround", "adascale"):
        if learned[f"{flag}_options"] and not learned[flag]:
            raise QPassesError(f"--{flag}-* options ({', '.join(learned[f'{flag}_options'])}) need --{flag}")
    if args.print_pipeline:
        from qpasses.core.pipeline import PassSpec, parse_pipeline
        from qpasses.quantize_pipeline import QuantizeOptions, build_quantize_pipeline

        user = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline or [])
        flow = build_quantize_pipeline(
            config,
            QuantizeOptions(
                calibrated=calib is not None,
                overrides=args.overrides,
                fold_batchnorm=not args.no_fold_batchnorm,
                cle=args.cle,
                seq_mse=args.seq_mse,
                seq_mse_options=seq_mse_options,
                **learned,
                bias_correction=False if args.no_bias_correction else None,
                target_given=args.target is not None,
                batch_size=args.batch_size,
                progress=not args.quiet,
            ),
            user_passes=[s if isinstance(s, PassSpec) else PassSpec(str(s)) for s in user],
        )
        print(flow.text())
        return 0
    result = quantize_model(
        args.model,
        calib,
        config,
        overrides=args.overrides,
        pipeline=pipeline,
        seq_mse=args.seq_mse,
        seq_mse_options=seq_mse_options,
        **learned,
        cle=args.cle,
        fold_batchnorm=not args.no_fold_batchnorm,
        target=args.target,
        bias_correction=False if args.no_bias_correction else None,
        batch_size=args.batch_size,
        progress=not args.quiet,
        verify=args.verify,
        auto_fallback=not args.no_auto_fallback,
        sqnr_floor_db=args.sqnr_floor,
    )
    quality = None
    if args.eval:  # before saving: bad evaluation data must not leave half the outputs behind
        import graph_ir
        from qpasses.data.evaluation import evaluate_npz

        quality = evaluate_npz(graph_ir.read_model(args.model), result.model, args.eval)
    out = result.save(args.output, encodings_version=args.encodings_version)
    print(result.report.format())
    print(result.summary())
    if quality is not None:
        print(quality.format())
    print(f"wrote {out / 'model.qdq.onnx'}, {out / 'encodings.json'}, {out / 'report.txt'}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from qpasses.passes.quantize.conformance import check_model
    from qpasses.targets.precision import PrecisionOptions

    if not Path(args.model).is_file():
        raise QPassesError(f"model file not found: {args.model}")
    if args.target is None and args.runtime is None:
        raise QPassesError("check needs --target NAME|FILE (conformance) and/or --runtime ort (runtime parity)")
    status = 0
    if args.runtime is not None:
        status = _check_runtime(args)
    if args.target is None:
        return status
    options = PrecisionOptions(
        act_bw=args.act_bw,
        weight_bw=args.weight_bw,
        bias_bw=args.bias_bw,
        float_bw=args.float_bw,
        float_bias_bw=args.float_bias_bw,
        calibrated=not args.no_calib,
    )
    findings = check_model(
        args.model, args.target, overrides=args.overrides, options=options, fold_batchnorm=not args.no_fold_batchnorm
    )
    for finding in findings:
        print(finding)
    if findings:
        print(f"{len(findings)} ops cannot run on target {args.target} as annotated")
        return EXIT_FINDINGS
    print(f"every op conforms to target {args.target}")
    return status


def _check_runtime(args: argparse.Namespace) -> int:
    """Runtime parity of an already-quantized model (ours or any tool's): exit 1 when it diverges."""
    import itertools

    import graph_ir
    from qpasses.data.sources import CalibrationData
    from qpasses.runtime.parity import check_parity, range_feeds

    model = graph_ir.read_model(args.model)
    if args.calib is not None:
        data = CalibrationData.from_source(args.calib, model, batch_size=args.batch_size)
        feeds = [dict(f) for f in itertools.islice(iter(data), args.batches)]
        source = str(args.calib)
    else:
        feeds = [range_feeds(model, batch=args.batch_size, seed=i) for i in range(args.batches)]
        source = "random inputs spanning each input's quantization range (give --calib for real data)"
    reference = graph_ir.read_model(args.reference) if args.reference else None
    try:
        report = check_parity(model, feeds, reference=reference, tolerance_db=args.tolerance_db)
    except Exception as exc:  # onnxruntime refusing the model is the user's input problem
        if type(exc).__module__.startswith("onnxruntime"):
            raise QPassesError(f"onnxruntime cannot run {args.model}: {str(exc).splitlines()[0]}") from None
        raise
    print(f"inputs: {source}")
    print(report.format())
    return 0 if report.ok else EXIT_FINDINGS


def _cmd_inspect(args: argparse.Namespace) -> int:
    import graph_ir
    from qpasses.cli.inspection import format_inspection, inspect_graph

    info = inspect_graph(graph_ir.load(args.model))
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def _cmd_list_passes(args: argparse.Namespace) -> int:
    from qpasses.passes import default_registry

    for name, cls in sorted(default_registry().passes.items()):
        print(f"{name:<20} {cls.description}")
    return 0


def _cmd_list_targets(args: argparse.Namespace) -> int:
    from qpasses.passes import default_registry

    for name, t in sorted(default_registry().targets.items()):
        print(f"{name:<8} {t.description}")
    return 0


def _check_output_path(model: str, output: str) -> None:
    """A model file to write: not the input, not a directory, in a writable directory (checked
    before any work, so a long run never ends on an unwritable path)."""
    path = Path(output)
    if path.exists() and path.resolve() == Path(model).resolve():
        raise QPassesError(f"output {output} is the input model; the input is never overwritten, choose another path")
    if path.is_dir() or output.endswith(("/", "\\")):
        raise QPassesError(f"output {output} is a directory; give a file path such as {path / 'model.onnx'}")
    _check_writable_dir(path.parent if str(path.parent) else Path("."), output)


def _check_output_dir(model: str, output: str) -> None:
    """An output folder: not an existing file, and its parent (or itself) writable."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise QPassesError(f"output {output} exists and is not a folder; -o takes a folder (outputs go inside it)")
    existing = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    _check_writable_dir(existing, output)


def _check_writable_dir(directory: Path, output: str) -> None:
    import os

    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise QPassesError(f"cannot write {output}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise QPassesError(f"cannot write {output}: folder {probe} is not writable")


def _write_traceback(exc: BaseException) -> str:
    """The full traceback of a bug, written where the user can attach it to a report."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="qpasses-crash-", suffix=".txt")
    with open(fd, "w", encoding="utf-8") as f:
        f.write(f"qpasses {' '.join(sys.argv[1:])}\n\n")
        f.write("".join(traceback.format_exception(exc)))
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qpasses", description="Quantize ONNX models through compiler passes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pass pipeline on a model")
    run.add_argument("model")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--pipeline", default="", help='comma-separated passes, e.g. "fold-batchnorm,cle"')
    group.add_argument("--pipeline-file", help="YAML/JSON pipeline with per-pass options")
    run.add_argument("--script", help="Python file defining rewrite(graph), run after the pipeline")
    run.add_argument("-o", "--output", required=True)
    run.add_argument(
        "--verify",
        choices=["none", "checker", "numeric"],
        default="numeric",
        help="after each pass: onnx.checker, plus FP32 equivalence for semantics-preserving passes "
        "(numeric, default); checker is the fast opt-out",
    )
    run.add_argument("--fixed-point", action="store_true", help="repeat the pipeline until nothing changes")
    run.add_argument("--dump-after", action="append", metavar="PASS", help="save the model after PASS ('all')")
    run.add_argument("--dump-dir")
    run.add_argument("--calib", help="calibration data for passes that need it (calibrate, seq-mse, ...)")
    run.add_argument("--target", help="target descriptor name or file, for passes that consult one")
    run.set_defaults(func=_cmd_run)

    insp = sub.add_parser("inspect", help="summarize a model")
    insp.add_argument("model")
    insp.add_argument("--json", action="store_true")
    insp.set_defaults(func=_cmd_inspect)

    q = sub.add_parser("quantize", help="quantize a model to QDQ ONNX + encodings JSON")
    q.add_argument("model")
    q.add_argument("--calib", help="calibration data: .npz (arrays keyed by input name) or QNN input list")
    q.add_argument("--no-calib", action="store_true", help="no calibration: weights only, activations float")
    q.add_argument("-o", "--output", required=True, help="output folder")
    q.add_argument("--act-bw", type=int, default=8, choices=[8, 16])
    q.add_argument("--weight-bw", type=int, default=8, help="4..16")
    q.add_argument("--bias-bw", type=int, default=32, choices=[8, 32])
    q.add_argument("--per-channel", action="store_true")
    q.add_argument("--act-mode", default="tf", choices=["tf", "enhanced", "percentile", "symmetric"])
    q.add_argument("--weight-mode", default="symmetric", choices=["tf", "symmetric", "enhanced", "adjusted"])
    q.add_argument("--overrides", help="encodings JSON (AIMET 0.6.1 / 1.0.0) applied as overrides")
    grp = q.add_mutually_exclusive_group()
    grp.add_argument("--pipeline", help="passes to run before quantization, e.g. 'remove-identity'")
    grp.add_argument("--pipeline-file")
    q.add_argument("--cle", action="store_true", help="cross-layer equalization before quantization")
    q.add_argument("--seq-mse", action="store_true", help="search weight ranges layer by layer (SeqMSE; needs data)")
    q.add_argument("--seq-mse-candidates", type=int, metavar="N", help="SeqMSE candidate ranges per channel (20)")
    q.add_argument("--seq-mse-batches", type=int, metavar="N", help="SeqMSE calibration batches (4)")
    q.add_argument("--seq-mse-loss", choices=["mse", "l1", "sqnr"], help="SeqMSE loss (mse)")
    q.add_argument(
        "--seq-mse-symmetry",
        choices=["asym", "symfp", "symqt"],
        help="SeqMSE layer inputs: asym quantized inputs vs FP32 outputs (default), "
        "symqt quantized model so far, symfp FP32",
    )
    q.add_argument("--seq-mse-exclude", action="append", metavar="OP", help="op to leave to min-max (repeatable)")
    q.add_argument(
        "--adaround",
        action="store_true",
        help="learn each weight's rounding layer by layer (AdaRound; needs data and torch: "
        'pip install "qpasses[learn]")',
    )
    q.add_argument("--adaround-iterations", type=int, metavar="N", help="AdaRound steps per layer (1000)")
    q.add_argument("--adaround-batches", type=int, metavar="N", help="AdaRound calibration batches (16)")
    q.add_argument(
        "--adaround-inputs",
        choices=["quantized", "fp32"],
        help="AdaRound layer inputs: the model with earlier layers rounded (default) or FP32",
    )
    q.add_argument("--adaround-exclude", action="append", metavar="OP", help="op to leave to min-max (repeatable)")
    q.add_argument(
        "--adascale",
        action="store_true",
        help='learn weight clipping/scaling per block (AdaScale; needs data and torch: pip install "qpasses[learn]")',
    )
    q.add_argument("--adascale-epochs", type=int, metavar="N", help="AdaScale passes over the batches per block (60)")
    q.add_argument("--adascale-batches", type=int, metavar="N", help="AdaScale calibration batches (16)")
    q.add_argument(
        "--adascale-block",
        action="append",
        metavar="START->END",
        help="a block by its input and output tensor names (repeatable; default: found automatically)",
    )
    q.add_argument("--adascale-exclude", action="append", metavar="OP", help="op to leave to min-max (repeatable)")
    q.add_argument("--no-fold-batchnorm", action="store_true")
    q.add_argument(
        "--print-pipeline",
        action="store_true",
        help="print the equivalent `qpasses run --pipeline` text and exit (run it with the same --calib/"
        "--target; identical model unless the automatic fallback acts)",
    )
    q.add_argument(
        "--no-auto-fallback",
        action="store_true",
        help="don't keep the quantizers that push an output below --sqnr-floor in higher precision",
    )
    q.add_argument(
        "--sqnr-floor",
        type=float,
        default=20.0,
        help="output SQNR vs FP32 (dB, on calibration batches) below which the fallback acts (default 20)",
    )
    q.add_argument(
        "--no-bias-correction",
        action="store_true",
        help="skip empirical bias correction (on by default with calibration data, off with "
        "--seq-mse/--adaround/--adascale)",
    )
    q.add_argument("--target", help="target descriptor: a name (see list-targets) or a JSON/YAML file")
    q.add_argument(
        "--float-bw",
        type=int,
        choices=[16, 32],
        help="precision of float tensors; without --calib, 16 converts the whole model to FP16",
    )
    q.add_argument(
        "--float-bias-bw",
        type=int,
        choices=[16, 32],
        help="float bias bitwidth when an op turns float by an override (default: the op's)",
    )
    q.add_argument("--batch-size", type=int, default=16)
    q.add_argument("--eval", metavar="NPZ", help="report SQNR vs FP32 (and top-1 with 'labels') on this data")
    q.add_argument("--encodings-version", default="0.6.1", choices=["0.6.1", "1.0.0"])
    q.add_argument(
        "--verify",
        choices=["none", "checker", "numeric"],
        default="numeric",
        help="per-pass verification (default numeric; checker is the fast opt-out)",
    )
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_quantize)

    c = sub.add_parser(
        "check",
        help="list ops a target cannot run as annotated; with --runtime ort, check that "
        "onnxruntime runs a QDQ model as its QDQ semantics say (exit 1 on findings)",
    )
    c.add_argument("model")
    c.add_argument("--target", help="target descriptor: a name (see list-targets) or a JSON/YAML file")
    c.add_argument(
        "--runtime",
        choices=["ort"],
        help="runtime parity of a QDQ model: default onnxruntime session vs exact QDQ semantics, "
        "plus the x86 non-VNNI kernels replayed",
    )
    c.add_argument("--calib", help="data for --runtime (.npz or input list; default: random inputs in range)")
    c.add_argument(
        "--reference",
        help="the FP32 model, for SQNR figures vs FP32 (default: the QDQ model with its activation Q/DQ removed)",
    )
    c.add_argument("--batches", type=int, default=4, help="batches for --runtime (default 4)")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument(
        "--tolerance-db",
        type=float,
        default=1.0,
        help="SQNR the runtime may lose vs exact QDQ semantics before it counts as diverging",
    )
    c.add_argument("--overrides", help="encodings / mixed-precision JSON applied as overrides")
    c.add_argument("--act-bw", type=int, choices=[8, 16], help="default activation bitwidth (target default)")
    c.add_argument("--weight-bw", type=int, help="default weight bitwidth, 4..16 (target default)")
    c.add_argument("--bias-bw", type=int, choices=[8, 32], help="default bias bitwidth (target default)")
    c.add_argument("--float-bw", type=int, choices=[16, 32])
    c.add_argument("--float-bias-bw", type=int, choices=[16, 32])
    c.add_argument(
        "--no-calib",
        action="store_true",
        help="no calibration data will be given: tensors without an override encoding fall back to float",
    )
    c.add_argument("--no-fold-batchnorm", action="store_true")
    c.set_defaults(func=_cmd_check)

    from qpasses.cli.amp import add_parser as add_amp_parser

    add_amp_parser(sub)
    sub.add_parser("list-passes", help="list registered passes").set_defaults(func=_cmd_list_passes)
    sub.add_parser("list-targets", help="list registered targets").set_defaults(func=_cmd_list_targets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QPassesError as exc:
        if args.verbose:
            raise
        print(f"qpasses: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("qpasses: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in qpasses (InternalError from a pass, or anything else)
        if args.verbose:
            raise
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not text.startswith("internal error"):
            text = f"internal error: {type(exc).__name__}: {text}"
        print(f"qpasses: {text} (a bug in qpasses; full traceback written to {_write_traceback(exc)})", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
