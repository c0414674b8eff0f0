"""Effect of the issue-15 Mamba-FSCIL fidelity fixes (docs/fidelity.md) on the offline digits FSCIL stream, on a CPU.

The fixes, each against the behaviour it replaced:

* ``chunk``: the suppression / separation losses per chunk of 8 samples, averaged (the official per-GPU batch), against
  one whole batch of 64 (before; ``loss_chunk=64``);
* ``protos``: the base prototypes recomputed with the final backbone (``base_protos=final``) against the running EMA
  means (before; ``base_protos=running``);
* ``once``: each few-shot sample kept once when the stream repeats a session over several epochs, against once per
  epoch (before; emulated by ignoring the stream's ``segment_start``).

Stream: ``digits_fscil`` (6 base classes, 2 sessions of 2-way 5-shot), ``--base-epochs`` base epochs,
``--epochs`` epochs per few-shot session; backbone ``tiny_cnn`` (width 16, 64 features) trained from scratch in the
base session; ``inc_grad_clip`` 1.0 by default (at width 64 the official suppression weight 100 diverges without it,
benchmarks/RESULTS.md "Mamba-FSCIL").

Usage: ``python benchmarks/fscil_fidelity.py [--seeds 0 1] [--json OUT]`` (prints a markdown table).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

import ctta
from ctta.backbones import create as backbone
from ctta.strategies import create
from ctta.streams import create as make_stream

VARIANTS = {
    "before (whole-batch losses, running means, each epoch's copy)": dict(chunk=False, protos=False, once=False),
    "+ per-GPU chunks only": dict(chunk=True, protos=False, once=False),
    "+ final-backbone prototypes only": dict(chunk=False, protos=True, once=False),
    "+ each few-shot sample once only": dict(chunk=False, protos=False, once=True),
    "after (all three, the defaults)": dict(chunk=True, protos=True, once=True),
}


def run_one(seed: int, fix: Dict[str, bool], args: argparse.Namespace) -> Dict[str, Any]:
    stream = make_stream("digits_fscil", base_classes=6, ways=2, shots=5, seed=seed, epochs=args.epochs,
                         base_epochs=args.base_epochs, batch_size=32)
    torch.manual_seed(seed)
    model = backbone("tiny_cnn", num_classes=10)
    st = create("mamba_fscil", model, lr=args.lr, d_state=args.d_state, backend="torch", seed=seed,
                supp_weight=args.supp_weight, inc_grad_clip=args.grad_clip,
                loss_chunk=8 if fix["chunk"] else 64, base_protos="final" if fix["protos"] else "running")
    if not fix["once"]:
        st.segment_start = lambda segment: None  # the stream's epochs unknown: every repeat is kept (the old way)
    t = time.perf_counter()
    result = ctta.run(stream, st, device="cpu", progress=False, on_diverge="mark")
    seg = result.segments.set_index("segment")
    last = f"eval@session-{len(stream.segments) // 2 - 1}"
    groups = result.groups
    row = {"seed": seed, "session0": round(100 * float(seg.loc["eval@session-0", "accuracy"]), 1),
           "final": round(100 * float(seg.loc[last, "accuracy"]), 1), "seconds": round(time.perf_counter() - t, 1)}
    if groups is not None and len(groups):
        g = groups[groups["segment"] == last]
        base, novel = g[g["group"] == "session-0"], g[g["group"] != "session-0"]
        row["base"] = round(100 * float(base["correct"].sum() / max(base["n"].sum(), 1)), 1)
        row["novel"] = round(100 * float(novel["correct"].sum() / max(novel["n"].sum(), 1)), 1)
    row["diverged"] = bool((seg["nonfinite"] > 0).any())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--base-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--supp-weight", type=float, default=100.0)
    ap.add_argument("--grad-clip", type=float, default=1.0, help="inc_grad_clip (0: none)")
    ap.add_argument("--only", nargs="*", default=None, help="variant indices to run (0-based)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.grad_clip = args.grad_clip or None
    torch.set_num_threads(1)
    rows: List[Dict[str, Any]] = []
    for i, (name, fix) in enumerate(VARIANTS.items()):
        if args.only is not None and str(i) not in args.only:
            continue
        for seed in args.seeds:
            r = run_one(seed, fix, args)
            r["variant"] = name
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print("\n| variant | seed | after session 0 | after session 2: all / base / novel | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seed']} | {r['session0']} | {r['final']} / {r.get('base', '-')} / "
              f"{r.get('novel', '-')}{' (diverged)' if r['diverged'] else ''} | {r['seconds']} |")


if __name__ == "__main__":
    main()
