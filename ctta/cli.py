"""``ctta-bench``: run a stream x strategy experiment, list what exists, or run the offline demo."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ctta.errors import CttaError

log = logging.getLogger("ctta")

USAGE = """ctta-bench [--stream NAME --strategy NAME[,NAME...] [options]]   run an experiment
       ctta-bench --resume --out DIR                                 continue the run(s) in DIR
       ctta-bench list                                               streams, strategies, backbones
       ctta-bench demo [--out DIR] [--device DEV]                    the offline default experiment
       ctta-bench report RUN [RUN ...] [--out DIR] [--force]         compare finished runs (mean +- std over seeds)
       ctta-bench corrupt --dataset cifar10 --out DIR [options]      write corrupted copies in the -C layout
       ctta-bench sweep GRID.yaml [--address ADDR] [--local]         a grid of runs as Ray tasks, then the reports
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


def _seeds(text: str) -> List[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers (1,2,3), got {text!r}") \
            from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers (1,2,3), got {text!r}")
    return seeds


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
    p.add_argument("--order", help="continual | random | reset | gradual | gradual_cotta | mixed | long_term | recurring")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=_seeds, help="seed, or several comma-separated (1,2,3): every strategy runs "
                   "for every seed, the comparison shows mean +- std")
    p.add_argument("--out", help="run folder (default runs/<stream>-<time>)")
    p.add_argument("--config", help="experiment YAML with stream/strategy/backbone/run sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set strategy.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out after its last finished segment (a finished run is shown as it "
                   "is); the rest of the command may be left out: its saved config.yaml is used")
    p.add_argument("--force", action="store_true", default=None,
                   help="overwrite the finished or unfinished run that --out holds")
    p.add_argument("--logger", help="mirror the run into trackers: tensorboard, wandb (offline), mlflow "
                   "(comma-separated; each needs its package)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    return p


def _cli_config(a: argparse.Namespace) -> Dict[str, Any]:
    seed = a.seed[0] if a.seed and len(a.seed) == 1 else a.seed
    return {
        "stream": {"name": a.stream, "data_root": a.data_root, "download": a.download, "corruptions": a.corruptions,
                   "severity": a.severity, "batch_size": a.batch_size, "num_samples": a.num_samples,
                   "order": a.order, "seed": seed},
        "strategy": {"name": a.strategy},
        "backbone": {"name": a.backbone, "weights": a.weights, "pretrained": a.pretrained,
                     "num_classes": a.num_classes},
        "run": {"device": a.device, "seed": seed, "out": a.out, "resume": a.resume, "force": a.force,
                "progress": False if a.no_progress else None, "loggers": a.logger},
    }


def _print_results(results: Dict[str, Any]) -> None:
    from ctta.evaluation import error_table, format_table

    table = error_table({k: r.summary for k, r in results.items()})
    first = next(iter(results.values()))
    if "mean" in table and table["mean"].isna().all():  # a learning stream: no shifted domains, no mean error
        table = table.drop(columns="mean")
        title = "Continual-learning results (accuracy %, forgetting in points)"
    else:
        title = "Online error (%) per domain"
    print(f"\n{title} on {first.summary['stream']} ({first.summary['device']}):")
    print(format_table(table))
    legend = [text for col, text in (("forgetting", "forgetting: clean accuracy lost over the stream, % points"),
                                     ("img/s", "img/s: images per second through adapt (or train) steps"))
              if col in table]
    if legend and "mean" in table:
        print(f"({'; '.join(legend)})")
    seeded = any("/seed-" in k for k in results)
    outs = {str(r.out.parent.parent if seeded else r.out.parent if len(results) > 1 else r.out)
            for r in results.values() if r.out is not None}
    for o in sorted(outs):
        if seeded and (Path(o) / "comparison.md").is_file():
            print(f"\nMean +- std over seeds:\n{(Path(o) / 'comparison.md').read_text()}")
    _print_files([r.out for r in results.values() if r.out is not None], sorted(outs))


RUN_FILES = ("steps.csv", "segments.csv", "groups.csv", "domains.csv", "summary.json", "config.yaml",
             "accuracy_over_time.png", "accuracy_matrix.png", "domain_errors.png", "report.html")


def _print_files(folders: List[Path], roots: List[str]) -> None:
    """The files the runs wrote, as they are on disk: each run folder's contents, then the pages to open."""
    if not folders:
        return
    kept = [f for f in RUN_FILES if (folders[0] / f).is_file()]
    print(f"\nRun folder{'s' if len(folders) > 1 else ''} ({', '.join(kept)}): "
          f"{', '.join(f'{f}/' for f in folders)}")
    pages = [f / "report.html" for f in folders if (f / "report.html").is_file()]
    pages += [Path(o) / "comparison.html" for o in roots if (Path(o) / "comparison.html").is_file()]
    if pages:
        print("Reports (open in a browser):")
        for page in pages:
            print(f"  {page}" + ("   (the runs side by side)" if page.name == "comparison.html" else ""))


def cmd_list() -> int:
    import shutil
    import textwrap

    from ctta import backbones, streams, strategies

    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    indent = " " * 21
    for title, reg in (("streams", streams.STREAMS), ("strategies", strategies.STRATEGIES),
                       ("backbones", backbones.BACKBONES)):
        print(f"{title}:")
        for n in reg.names():
            text = reg.describe(n)
            if title == "streams":
                text += "".join(f" {label.capitalize()}: {', '.join(values)}."
                                for label, values in streams.stream_choices(n).items())
            print(textwrap.fill(text, width, initial_indent=f"  {n:<18} ", subsequent_indent=indent,
                                break_on_hyphens=False) if text else f"  {n}")
    print("  (plus any timm model name, e.g. resnet50, vit_base_patch16_224)")
    return 0


def cmd_run(argv: List[str]) -> int:
    from ctta.config import load_yaml, resolve
    from ctta.experiment import run_experiment

    a = run_parser().parse_args(argv)
    _logging(a.quiet)
    experiment = load_yaml(a.config) if a.config else None
    if a.resume and experiment is None:
        experiment = _saved_config(a.out)  # the run as it was started; flags given must agree with it
        for section, name in (("stream", a.stream), ("strategy", a.strategy), ("backbone", a.backbone)):
            saved = experiment.get(section) or {}
            if name and name != saved.get("name"):  # another one named: the saved options are not its options
                experiment[section] = {"name": saved.get("name")}
    cfg = resolve(experiment, _cli_config(a), a.set)
    if not cfg["backbone"].get("name"):
        cfg["backbone"]["name"] = "resnet20_cifar" if cfg["stream"].get("name") in ("cifar10c", None) else None
    results = run_experiment(cfg)
    _print_results(results)
    return 0


def _saved_config(out: Optional[str]) -> Dict[str, Any]:
    """``--resume`` without ``--config``: the config.yaml saved in ``--out`` (a run folder, or the root of several
    runs), under the flags given."""
    from ctta.config import load_yaml

    if not out:
        raise CttaError("--resume needs --out: the folder of the run to continue")
    saved = Path(out) / "config.yaml"
    if not saved.is_file():
        raise CttaError(f"nothing to resume in {out!r}: no config.yaml there (give the whole command again with "
                        f"--resume, or check --out)")
    cfg = load_yaml(saved)
    backbone = cfg.get("backbone") or {}
    if "class" in backbone and not backbone.get("name"):  # written by ctta.run: no backbone to rebuild
        raise CttaError(f"{str(saved)!r} was written by the Python API (ctta.run); resume that run from Python with "
                        f"ctta.run(..., out={out!r}, resume=True)")
    return cfg


def cmd_report(argv: List[str]) -> int:
    from ctta.evaluation import find_runs, load_run, write_comparison_report

    p = argparse.ArgumentParser(prog="ctta-bench report",
                                description="Compare finished runs: table (mean +- std over seeds), curves, HTML.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders holding run folders")
    p.add_argument("--out", help="where to write comparison.csv/.md/.html (default: the RUN folder when one is "
                   "given, else ./report)")
    p.add_argument("--force", action="store_true", help="compare runs even when their stream specs differ")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    _logging(a.quiet)
    runs = [load_run(r) for r in find_runs(a.runs)]
    out = Path(a.out) if a.out else (Path(a.runs[0]) if len(a.runs) == 1 else Path("report"))
    files = write_comparison_report(runs, out, force=a.force)
    print(files["markdown"].read_text())
    print(f"Comparison of {len(runs)} run(s) written to {out}/ (comparison.csv, comparison.md, comparison.html, "
          f"accuracy_over_time.png)")
    return 0


def cmd_demo(argv: List[str]) -> int:
    from ctta.demo import demo_config
    from ctta.experiment import run_experiment

    p = argparse.ArgumentParser(prog="ctta-bench demo", description="The offline default experiment.")
    p.add_argument("--out", default=None, help="run folder (default runs/demo, overwritten by each demo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="overwrite the runs an explicit --out holds")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    _logging(a.quiet)
    print("ctta-bench demo: scikit-learn digits under 5 corruptions (severity 5); source, BN, TENT, CoTTA")
    cfg = demo_config(out=a.out, device=a.device)
    cfg["run"]["force"] = a.force or a.out is None  # runs/demo is the demo's own scratch folder
    results = run_experiment(cfg, progress=not a.no_progress)
    _print_results(results)
    return 0


# subcommands: name -> handler of the remaining arguments (anything else is `run`'s flags)
def cmd_corrupt(argv: List[str]) -> int:
    """``ctta-bench corrupt``: the corruption engine writing a -C folder (see :mod:`ctta.corrupt_dataset`)."""
    from ctta import corrupt_dataset

    _logging("-q" in argv)
    return corrupt_dataset.main([a for a in argv if a != "-q"])


def cmd_sweep(argv: List[str]) -> int:
    """``ctta-bench sweep GRID.yaml``: streams x backbones x strategies x seeds as Ray tasks (see :mod:`ctta.sweep`)."""
    from ctta import sweep

    p = argparse.ArgumentParser(prog="ctta-bench sweep",
                                description="Run a grid of streams x backbones x strategies x seeds (Ray tasks when "
                                "Ray is installed, else one after another), skip finished runs, write the reports.")
    p.add_argument("grid", help="grid YAML (streams, strategies, backbones, seeds, overrides, out, resources)")
    p.add_argument("--out", help="sweep folder (default: the grid's out)")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto or ray://host:10001); default: start a "
                   "local one sized to this machine")
    p.add_argument("--local", action="store_true", help="no Ray: run the grid one run after another in-process")
    p.add_argument("--num-gpus", type=float, help="GPUs per run (fractions share a GPU); default: the grid's")
    p.add_argument("--num-cpus", type=float, help="CPUs per run; default: the grid's")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value of every run, e.g. --set run.device=cpu (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each would run, resume or skip")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final tables")
    a = p.parse_args(argv)
    _logging(a.quiet)
    if a.local and a.address:
        raise CttaError(f"--local and --address {a.address!r} exclude each other")
    if a.dry_run:
        for spec in sweep.expand(a.grid, a.out, a.set):
            print(f"{sweep.run_state(spec.cfg):<12} {spec.id}  -> {spec.out}")
        return 0
    resources = {k: v for k, v in (("num_gpus", a.num_gpus), ("num_cpus", a.num_cpus)) if v is not None}
    result = sweep.sweep(a.grid, out=a.out, overrides=a.set, backend="local" if a.local else "auto",
                         address=a.address, resources=resources, progress=not a.no_progress)
    print(sweep.format_result(result))
    from ctta.evaluation.scenario_grid import grid_report

    files = grid_report(sweep.load_grid(a.grid), result)  # a scenario grid (UniTTA): strategies x scenarios
    if files:
        print(files["markdown"].read_text())
        print(f"(heat map: {files['heatmap']})")
    return 1 if result.failed else 0


COMMANDS: Dict[str, Callable[[List[str]], int]] = {
    "run": lambda argv: cmd_run(argv),
    "demo": lambda argv: cmd_demo(argv),
    "list": lambda argv: cmd_list(),
    "report": lambda argv: cmd_report(argv),
    "corrupt": lambda argv: cmd_corrupt(argv),
    "sweep": lambda argv: cmd_sweep(argv),
}


def _logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _demo_flags_only(argv: List[str]) -> bool:
    """No arguments, or only flags the demo takes (``ctta-bench --no-progress -q``): the default run is the demo."""
    i = 0
    while i < len(argv):
        if argv[i] in ("--no-progress", "-q", "--quiet"):
            i += 1
        elif argv[i] in ("--device", "--out") and i + 1 < len(argv):
            i += 2
        else:
            return False
    return True


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; user errors print one line and exit 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if _demo_flags_only(argv):
            return cmd_demo(argv)
        if argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return cmd_run(argv)
    except CttaError as e:
        print(f"ctta-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ctta-bench: interrupted; finished segments are saved, rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
