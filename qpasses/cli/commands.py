"""The ``qpasses`` subcommands (run, quantize, check, inspect, list-*) and the output-path checks they share;
the parser and ``main`` are in ``app``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qpasses.core.errors import QPassesError

EXIT_USER_ERROR = 2
EXIT_FINDINGS = 1  # `check`: the model has ops the target cannot run, or the runtime diverges
EXIT_INTERNAL_ERROR = 1  # a bug in qpasses


def cmd_run(args: argparse.Namespace) -> int:
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


def cmd_quantize(args: argparse.Namespace) -> int:
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
                ("grid", args.adaround_grid),
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
        from qpasses.passes import default_registry
        from qpasses.quantize_pipeline import QuantizeOptions, build_quantize_pipeline, default_cle
        from qpasses.targets.resolve import resolve_target

        user = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline or [])
        flow = build_quantize_pipeline(
            config,
            QuantizeOptions(
                calibrated=calib is not None,
                overrides=args.overrides,
                fold_batchnorm=not args.no_fold_batchnorm,
                fold_matmul_bias=not args.no_fold_matmul_bias,
                cle=default_cle(resolve_target(args.target, default_registry())) if args.cle is None else args.cle,
                seq_mse=args.seq_mse,
                seq_mse_options=seq_mse_options,
                **learned,
                bias_correction=False if args.no_bias_correction else None,
                target_given=args.target is not None,
                batch_size=args.batch_size,
                progress=not args.quiet,
                quantize_outputs=args.quantize_outputs,
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
        fold_matmul_bias=not args.no_fold_matmul_bias,
        target=args.target,
        bias_correction=False if args.no_bias_correction else None,
        batch_size=args.batch_size,
        progress=not args.quiet,
        verify=args.verify,
        auto_fallback=not args.no_auto_fallback,
        quantize_outputs=args.quantize_outputs,
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


def cmd_check(args: argparse.Namespace) -> int:
    from qpasses.target_check import check_model
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


def cmd_inspect(args: argparse.Namespace) -> int:
    import graph_ir
    from qpasses.cli.inspection import format_inspection, inspect_graph

    info = inspect_graph(graph_ir.load(args.model))
    print(json.dumps(info, indent=2) if args.json else format_inspection(info))
    return 0


def cmd_list_passes(args: argparse.Namespace) -> int:
    from qpasses.passes import default_registry

    for name, cls in sorted(default_registry().passes.items()):
        print(f"{name:<20} {cls.description}")
    return 0


def cmd_list_targets(args: argparse.Namespace) -> int:
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
