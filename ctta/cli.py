"""``ctta-bench``: run a stream x strategy experiment, list what exists, or run the offline demo."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Dict, List, Optional

from ctta.errors import CttaError

log = logging.getLogger("ctta")

USAGE = """ctta-bench [--stream NAME --strategy NAME[,NAME...] [options]]   run an experiment
       ctta-bench list                                               streams, strategies, backbones
       ctta-bench demo [--out DIR] [--device DEV]                    the offline default experiment
       ctta-bench                                                    (no arguments) = demo"""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _severity(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 1 <= v <= 5:
        raise argparse.ArgumentTypeError(f"severity must be an integer from 1 to 5, got {text!r}")
    return v


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctta-bench", usage=USAGE,
                                description="Simulate continual / test-time adaptation: a strategy on a stream.")
    p.add_argument("--stream", help="stream name (see `ctta-bench list`)")
    p.add_argument("--strategy", help="strategy name, or several comma-separated to compare")
    p.add_argument("--backbone", help="backbone: a registered name or any timm model name")
    p.add_argument("--weights", help="local checkpoint for the backbone")
    p.add_argument("--pretrained", action="store_true", default=None, help="timm/hub pretrained weights (online)")
    p.add_argument("--num-classes", type=_positive_int)
    p.add_argument("--data-root", help="dataset folder or .npz file")
    p.add_argument("--download", action="store_true", default=None, help="download the dataset if absent (online)")
    p.add_argument("--corruptions", help="comma-separated subset of corruptions (default: all 15, standard order)")
    p.add_argument("--severity", type=_severity)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--num-samples", type=_positive_int, help="samples per domain (quick runs)")
    p.add_argument("--order", help="continual | random | reset")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run folder (default runs/<stream>-<time>)")
    p.add_argument("--config", help="experiment YAML with stream/strategy/backbone/run sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set strategy.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", default=None, help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    return p


def _cli_config(a: argparse.Namespace) -> Dict[str, Any]:
    return {
        "stream": {"name": a.stream, "data_root": a.data_root, "download": a.download, "corruptions": a.corruptions,
                   "severity": a.severity, "batch_size": a.batch_size, "num_samples": a.num_samples,
                   "order": a.order, "seed": a.seed},
        "strategy": {"name": a.strategy},
        "backbone": {"name": a.backbone, "weights": a.weights, "pretrained": a.pretrained,
                     "num_classes": a.num_classes},
        "run": {"device": a.device, "seed": a.seed, "out": a.out, "resume": a.resume,
                "progress": False if a.no_progress else None},
    }


def _print_results(results: Dict[str, Any]) -> None:
    from ctta.evaluation import error_table, format_table

    table = error_table({k: r.summary for k, r in results.items()})
    first = next(iter(results.values()))
    print(f"\nOnline error (%) per domain on {first.summary['stream']} ({first.summary['device']}):")
    print(format_table(table))
    outs = {str(r.out.parent if len(results) > 1 else r.out) for r in results.values() if r.out is not None}
    for o in sorted(outs):
        print(f"\nReport written to {o}/ (steps.csv, segments.csv, domains.csv, summary.json, config.yaml, "
              f"accuracy_over_time.png)")


def cmd_list() -> int:
    from ctta import backbones, streams, strategies

    for title, reg in (("streams", streams.STREAMS), ("strategies", strategies.STRATEGIES),
                       ("backbones", backbones.BACKBONES)):
        print(f"{title}:")
        for n in reg.names():
            print(f"  {n:<18} {reg.describe(n)}")
    print("  (plus any timm model name, e.g. resnet50, vit_base_patch16_224)")
    return 0


def cmd_run(argv: List[str]) -> int:
    from ctta.config import load_yaml, resolve
    from ctta.experiment import run_experiment

    a = run_parser().parse_args(argv)
    _logging(a.quiet)
    experiment = load_yaml(a.config) if a.config else None
    cfg = resolve(experiment, _cli_config(a), a.set)
    if not cfg["backbone"].get("name"):
        cfg["backbone"]["name"] = "resnet20_cifar" if cfg["stream"].get("name") in ("cifar10c", None) else None
    results = run_experiment(cfg)
    _print_results(results)
    return 0


def cmd_demo(argv: List[str]) -> int:
    from ctta.demo import demo_config
    from ctta.experiment import run_experiment

    p = argparse.ArgumentParser(prog="ctta-bench demo", description="The offline default experiment.")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    _logging(a.quiet)
    print("ctta-bench demo: scikit-learn digits under 5 corruptions (severity 5); source, BN, TENT, CoTTA")
    cfg = demo_config(out=a.out, device=a.device)
    results = run_experiment(cfg, progress=not a.no_progress)
    _print_results(results)
    return 0


def _logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; user errors print one line and exit 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] == "demo":
            return cmd_demo(argv[1:])
        if argv[0] == "list":
            return cmd_list()
        if argv[0] == "run":
            argv = argv[1:]
        return cmd_run(argv)
    except CttaError as e:
        print(f"ctta-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctta-bench: interrupted; finished segments are saved, rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
