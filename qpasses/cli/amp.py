"""``qpasses amp``: the AMP command (registered by ``qpasses.cli.commands``; kept here so the flags live with AMP)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from qpasses.core.errors import QPassesError


def _drop(text: str) -> float | None:
    if text.strip().lower() in ("none", "full"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def add_parser(sub: Any) -> None:
    """Add the ``amp`` subcommand to the ``qpasses`` subparsers."""
    a = sub.add_parser(
        "amp", help="automatic mixed precision: choose a precision per layer group under an accuracy target"
    )
    a.add_argument("model")
    a.add_argument("--calib", help="calibration data (.npz or QNN input list); default: shipped data beside the model")
    a.add_argument(
        "--eval-script",
        required=True,
        help="Python file defining evaluate(session) -> float (higher is better), optionally "
        "evaluate_phase1(session) for phase 1",
    )
    a.add_argument(
        "--candidates",
        default="8/8,16/8,16/16",
        help="comma-separated A/W: int activation bits / int weight bits; 16f/16f for float16 (default 8/8,16/8,16/16)",
    )
    # A default target keeps a bare `qpasses amp` from returning the cheapest (and worst) point.
    a.add_argument(
        "--allowed-drop",
        type=_drop,
        default=0.01,
        metavar="DROP",
        help="allowed score drop from FP32 (default 0.01); 'none' scores the full pareto curve and "
        "picks its cheapest point",
    )
    a.add_argument("--algorithm", default="binary", choices=["binary", "interpolation", "brute-force", "demotion"])
    a.add_argument("--reverse", action="store_true", help="phase 2 starts at the lowest candidates and promotes")
    a.add_argument(
        "--phase1",
        default="auto",
        choices=["auto", "exhaustive", "proxy"],
        help="exhaustive: the eval script scores every group at every lower candidate; proxy: rank them "
        "by output SQNR on a few calibration samples in the simulation, the script only checks the "
        "steps that stop phase 2; auto (default): proxy from 24 phase-1 evaluations on",
    )
    a.add_argument(
        "--proxy-samples",
        type=int,
        default=2,
        metavar="N",
        help="calibration samples the phase-1 proxy runs on (default 2)",
    )
    a.add_argument(
        "--executor",
        default="local",
        choices=["local", "process", "ray"],
        help="where phase-1 evaluations run (ray: pip install 'qpasses[ray]')",
    )
    a.add_argument("--workers", type=int, help="process/ray workers (default: CPUs)")
    a.add_argument("--ray-address", help="Ray cluster to connect to (default: start a local one)")
    a.add_argument("--target", help="target descriptor: candidates it has no kernel for are dropped per group")
    a.add_argument("--use-all-candidates", action="store_true", help="ignore the target's supported kernels")
    a.add_argument("--per-channel", action="store_true")
    a.add_argument("--act-mode", default="tf", choices=["tf", "enhanced", "percentile", "symmetric"])
    a.add_argument("--weight-mode", default="symmetric", choices=["tf", "symmetric", "enhanced", "adjusted"])
    a.add_argument(
        "--resume",
        action="store_true",
        help="reuse the cache in OUTDIR/.cache (clean_start=False); refused (exit 2) when it was made for "
        "another model, eval script, qpasses version or options; default: start clean",
    )
    a.add_argument(
        "--no-simulate", action="store_true", help="score rebuilt QDQ models instead of the one-session simulation"
    )
    a.add_argument("--no-reduce-converts", action="store_true", help="skip phase 3 (convert-op reduction)")
    a.add_argument("--no-bias-correction", action="store_true")
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("-o", "--output", required=True, help="results folder (pareto.json/.png, model.qdq.onnx, cache)")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qpasses.amp.errors import AmpWarning
    from qpasses.amp.evaluation import script_callbacks
    from qpasses.amp.mixed_precision import choose_mixed_precision
    from qpasses.cli.commands import default_calibration
    from qpasses.quant.config import QuantConfig

    if not Path(args.model).is_file():
        raise QPassesError(f"model file not found: {args.model}")
    calib = args.calib
    if calib is None:
        found = default_calibration(args.model)
        if found is None:
            raise QPassesError(f"no --calib given and no shipped calibration data beside {args.model}")
        calib = str(found)
        print(f"using calibration data {calib}")
    phase1, phase2 = script_callbacks(args.eval_script)
    config = QuantConfig(per_channel=args.per_channel, act_mode=args.act_mode, weight_mode=args.weight_mode)
    with warnings.catch_warnings():  # printed below as "warning: ...", once
        warnings.simplefilter("ignore", AmpWarning)
        result = choose_mixed_precision(
            args.model,
            calib,
            args.candidates,
            phase1,
            phase2,
            args.allowed_drop,
            args.output,
            not args.resume,
            config=config,
            target=args.target,
            use_all_amp_candidates=args.use_all_candidates,
            phase2_reverse=args.reverse,
            algorithm=args.algorithm,
            reduce_converts=not args.no_reduce_converts,
            phase1=args.phase1,
            proxy_samples=args.proxy_samples,
            executor=args.executor,
            workers=args.workers,
            ray_address=args.ray_address,
            simulate=not args.no_simulate,
            bias_correction=not args.no_bias_correction,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
    for message in result.messages:
        if message not in result.warnings:
            print(f"note: {message}")
    if result.promotions is not None:
        print(f"demotion: {len(result.promotions)} groups stay high: {', '.join(result.promotions) or '(none)'}")
    for group, candidate in result.assignment.items():
        print(f"  {group:<40} {candidate}")
    print(result.summary())
    print(f"wrote {', '.join(p.name for p in result.files)} in {args.output}")
    for text in result.warnings:  # last, so they are not lost above the table
        print(f"warning: {text}", file=sys.stderr)
    return 0
