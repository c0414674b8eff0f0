"""ViLAaD with an in-house CLIP teacher against its baselines on a small SFDA target (CPU).

Target: the ``sfda`` stream on the shared CIFAR-10 test set under gaussian_noise severity 5, 1000 images, 3 epochs,
batch 64; source model the shared ResNet-20. Rows: source (no adaptation), the in-house CLIP zero-shot
(``clip_zeroshot``, teacher alone), AaD, ViLAaD with the in-house teacher (``include_self`` true / false), and
ViLAaD with a random ``clip_tiny`` teacher (control: near-uniform targets) and with the in-house teacher whose
class names are rotated by one (control: a confident but wrong teacher; class c's prompts name class c+1).
Error (%) is the eval segment's (after adapting), next to the online error of each of the three epoch segments;
for rows with a teacher, the teacher alone on the eval images (error, mean max probability). Each strategy runs in its own process so that the CPU peak memory
(process peak RSS, the engine's ``peak_memory_mb``) is its own; images/s is the engine's ``adapt_images_per_s``.
The in-house teacher comes from ``benchmarks/inhouse_clip.py`` (``--teacher PATH``).

Usage: ``python benchmarks/vilaad_inhouse.py [--rows source,aad,aad:lr=1e-2,...] [--json OUT]`` (prints a markdown
table; ``:lr=`` sets the adapting strategies' base lr, default AaD's 1e-3). The RESULTS.md table: the default rows,
then ``--rows aad:lr=1e-2,vilaad:lr=1e-2,vilaad_noself:lr=1e-2,vilaad_random:lr=1e-2,vilaad_permuted:lr=1e-2,
aad:lr=5e-2,vilaad:lr=5e-2,vilaad_permuted:lr=5e-2`` with the same ``--json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

ROWS = ("source", "clip_zeroshot", "aad", "vilaad", "vilaad_noself", "vilaad_random", "vilaad_permuted")
LABELS = {"source": "source (ResNet-20, no adaptation)", "clip_zeroshot": "in-house CLIP zero-shot (teacher alone)",
          "aad": "AaD", "vilaad": "ViLAaD, in-house teacher, include_self", "vilaad_noself":
          "ViLAaD, in-house teacher, neighbours only", "vilaad_random": "ViLAaD, random clip_tiny teacher (control)",
          "vilaad_permuted": "ViLAaD, in-house teacher with class names rotated by one (confidently wrong control)"}
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SOURCE = "/work/shared/models/resnet20-12fca82f.th"
DATA = "/work/shared/data/cifar10"
TEACHER = str(Path("~/.cache/ctta-bench/models/inhouse_clip_cifar10.pt").expanduser())
NUM, EPOCHS, BATCH = 1000, 3, 64


def run_one(row: str, teacher_path: str, threads: int) -> Dict[str, Any]:
    """One strategy on the SFDA target in this process; error (%) per segment plus the cost fields.

    ``row`` is one of :data:`ROWS`, optionally with ``:lr=VALUE`` (the adapting strategies' base lr, default 1e-3).
    """
    full_row = row
    row, _, opt = row.partition(":")
    kw: Dict[str, Any] = {"lr": float(opt.split("=", 1)[1])} if opt.startswith("lr=") else {}
    import torch

    import ctta
    from ctta.backbones import create as backbone
    from ctta.strategies import create
    from ctta.streams import create as make_stream

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    stream = make_stream("sfda", target="gaussian_noise", dataset="cifar10", data_root=DATA, severity=5,
                         num_samples=NUM, epochs=EPOCHS, batch_size=BATCH)
    max_iter = EPOCHS * -(-NUM // BATCH)
    inhouse = {"name": "clip", "checkpoint": teacher_path, "class_names": "cifar10", "templates": "simple"}
    if row == "clip_zeroshot":
        spec = dict(inhouse)
        st = create("clip_zeroshot", backbone(spec.pop("name"), num_classes=10, **spec))
    else:
        model = backbone("resnet20_cifar", num_classes=10, weights=SOURCE)
        if row == "source":
            st = create("source", model)
        elif row == "aad":
            st = create("aad", model, max_iter=max_iter, **kw)
        elif row in ("vilaad", "vilaad_noself"):
            st = create("vilaad", model, teacher=inhouse, include_self=row == "vilaad", max_iter=max_iter, **kw)
        elif row == "vilaad_permuted":
            rotated = dict(inhouse, class_names=CIFAR10[1:] + CIFAR10[:1])
            st = create("vilaad", model, teacher=rotated, max_iter=max_iter, **kw)
        elif row == "vilaad_random":
            st = create("vilaad", model, teacher={"name": "clip_tiny", "class_names": "cifar10"}, max_iter=max_iter,
                        **kw)
        else:
            raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    r = ctta.run(stream, st, device="cpu", progress=False)
    seg = r.segments.set_index("segment")["accuracy"]
    out: Dict[str, Any] = {"row": full_row, "segments": {k: 100 * (1 - float(v)) for k, v in seg.items()}}
    teacher = getattr(st, "teacher", None) or (st.model if row == "clip_zeroshot" else None)
    if teacher is not None:  # the teacher alone on the target (eval segment): error and confidence
        x, y, _ = next(s for s in stream if s.kind == "eval").materialise(torch.device("cpu"))
        with torch.no_grad():
            q = torch.cat([teacher.eval()(x[i:i + 256]).softmax(1) for i in range(0, len(x), 256)])
        out["teacher_error"] = 100 * float((q.argmax(1) != y).float().mean())
        out["teacher_mean_max_prob"] = float(q.max(1).values.mean())
    for k in ("adapt_images_per_s", "eval_images_per_s", "peak_memory_mb", "trainable_parameters"):
        out[k] = r.summary.get(k)
    return out


def table(results: Dict[str, Dict[str, Any]]) -> str:
    lines = ["| strategy | online error, epochs 0-2 (%) | error after adapting (eval, %) | teacher error (%) / "
             "mean max prob | adapt img/s | peak RSS (MiB) |", "| --- | --- | --- | --- | --- | --- |"]
    def order(row: str) -> tuple:
        base, _, opt = row.partition(":")
        return (opt, ROWS.index(base) if base in ROWS else len(ROWS))

    for row in sorted(results, key=order):
        r = results[row]
        base, _, opt = row.partition(":")
        label = LABELS.get(base, base) + (f", {opt.replace('=', ' ')}" if opt else "")
        s = r["segments"]
        online = " / ".join(f"{s[k]:.1f}" for k in sorted(s) if "epoch" in k)
        ips = r.get("adapt_images_per_s")
        teach = (f"{r['teacher_error']:.1f} / {r['teacher_mean_max_prob']:.2f}" if "teacher_error" in r else "-")
        lines.append(f"| {label} | {online} | {s.get('target/eval', float('nan')):.1f} | {teach} | "
                     f"{f'{ips:.0f}' if ips else '-'} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="results file: read first (rows kept), updated after each row")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one row, JSON on stdout
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.teacher, args.threads)), flush=True)
        return
    path = Path(args.json) if args.json else None
    results = json.loads(path.read_text()) if path and path.is_file() else {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for row in args.rows.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", row, "--teacher", args.teacher, "--threads",
                               str(args.threads)], capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"row {row} failed (exit {proc.returncode})")
        results[row] = json.loads(line[len("RESULT "):])
        logging.getLogger("vilaad_inhouse").warning("%s: %s", row, results[row])
        if path:
            path.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
