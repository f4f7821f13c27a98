"""The ``qpasses`` command line: the parser (every subcommand and flag) and ``main`` (exit codes: 2 for the
user's mistakes, one line; 1 for findings of ``check`` and for bugs in qpasses, with the traceback in a file)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qpasses.cli.commands import (
    EXIT_INTERNAL_ERROR,
    EXIT_USER_ERROR,
    cmd_check,
    cmd_inspect,
    cmd_list_passes,
    cmd_list_targets,
    cmd_quantize,
    cmd_run,
)
from qpasses.core.errors import QPassesError


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
    run.set_defaults(func=cmd_run)

    insp = sub.add_parser("inspect", help="summarize a model")
    insp.add_argument("model")
    insp.add_argument("--json", action="store_true")
    insp.set_defaults(func=cmd_inspect)

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
    q.add_argument(
        "--cle",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cross-layer equalization before quantization (default: on where the target quantizes weights per tensor)",
    )
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
    q.add_argument(
        "--adaround-grid",
        choices=["seq-mse", "mode"],
        help="AdaRound's grid: searched per channel as SeqMSE does, kept when better on held-out batches "
        "(default), or the weight mode's (min-max)",
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
        "--no-fold-matmul-bias",
        action="store_true",
        help="keep each MatMul and its bias Add apart (default: one Gemm, one rounding, an int32 bias)",
    )
    q.add_argument(
        "--print-pipeline",
        action="store_true",
        help="print the equivalent `qpasses run --pipeline` text and exit (run it with the same --calib/"
        "--target; identical model unless the automatic fallback acts)",
    )
    q.add_argument(
        "--quantize-outputs",
        action="store_true",
        help="quantize what the model returns too (default: outputs, back to a head on pooled features, stay "
        "float: an 8-bit output clips values the calibration never reached)",
    )
    q.add_argument(
        "--no-auto-fallback",
        action="store_true",
        help="don't act when an output falls below --sqnr-floor (by default: first clip the activation ranges "
        "whose narrower grids lift the outputs, then keep the quantizers costing most in higher precision)",
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
    q.set_defaults(func=cmd_quantize)

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
    c.set_defaults(func=cmd_check)

    from qpasses.cli.amp import add_parser as add_amp_parser

    add_amp_parser(sub)
    sub.add_parser("list-passes", help="list registered passes").set_defaults(func=cmd_list_passes)
    sub.add_parser("list-targets", help="list registered targets").set_defaults(func=cmd_list_targets)
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
