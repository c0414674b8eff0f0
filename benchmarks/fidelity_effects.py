"""Effect of the issue-15 fidelity fixes (docs/fidelity.md), each against the behaviour it replaced, on a CPU.

* ``aad``: AaD on the ``sfda`` target of benchmarks/vilaad_inhouse.py (CIFAR-10 test, gaussian_noise 5, 1000 images,
  3 epochs, batch 64, the shared ResNet-20) with the schedule length read from the stream (now) against no decay
  (before: ``max_iter: null`` kept lr and the dispersion weight constant; here ``max_iter`` = 10^12, which keeps both
  at their initial values to 1e-9), at lr 1e-3 (the paper's) and 1e-2.
* ``rsgs``: RSGS on a CIFAR-10-C stream (the shared ResNet-20; ``--corruptions``, ``--num`` images per domain,
  ``--rounds`` passes over them, severity 5) with SAR's model recovery (now, ``reset_constant`` 0.2) and without
  (before, 0), and how many recoveries happened.
* ``coso``: CoSO on Split CIFAR-10 (5 sessions of 2 classes, ``--train-per-class``, ``--epochs``) on the small ViT of
  benchmarks/pretrain_vit.py (``--vit``), official behaviour (now) against the replaced one (before: half cosine per
  batch, textbook frequent directions, energy rule ``reach``, the checkpoint's head, H re-orthonormalised), plus each
  replaced behaviour alone (also the first fix's ``cos(99 pi e / (200 (K - 1)))``, one epoch early).

Usage: ``python benchmarks/fidelity_effects.py aad|rsgs|coso [--json OUT]`` (prints a markdown table).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

import ctta
from ctta.backbones import create as backbone
from ctta.strategies import create
from ctta.streams import create as make_stream

SOURCE = "/work/shared/models/resnet20-12fca82f.th"
DATA = "/work/shared/data/cifar10"


def _errors(result: Any) -> Dict[str, float]:
    seg = result.segments.set_index("segment")["accuracy"]
    return {k: round(100 * (1 - float(v)), 2) for k, v in seg.items()}


def aad(args: argparse.Namespace) -> List[Dict[str, Any]]:
    stream = make_stream("sfda", target="gaussian_noise", dataset="cifar10", data_root=DATA, severity=5,
                         num_samples=1000, epochs=3, batch_size=64)
    rows = []
    for lr in (1e-3, 1e-2):
        for schedule in (True, False):
            torch.manual_seed(0)
            st = create("aad", backbone("resnet20_cifar", num_classes=10, weights=SOURCE), lr=lr,
                        **({} if schedule else {"max_iter": 10 ** 12}))
            t = time.perf_counter()
            r = ctta.run(stream, st, device="cpu", progress=False)
            rows.append({"lr": lr, "schedule": schedule, "max_iter": st.max_iter, "errors": _errors(r),
                         "final_lr_factor": st.optimizer.param_groups[-1]["lr"] / lr,
                         "final_dispersion_weight": st.dispersion_weight(), "seconds": time.perf_counter() - t})
    return rows


def rsgs(args: argparse.Namespace) -> List[Dict[str, Any]]:
    stream = make_stream("cifar10c", data_root=DATA, corruptions=args.corruptions, severity=5, num_samples=args.num,
                         order="recurring" if args.rounds > 1 else "continual",
                         **({"rounds": args.rounds} if args.rounds > 1 else {}))
    rows = []
    for lr in (float(v) for v in args.lrs.split(",")):
        for reset_constant in (0.2, 0.0):
            torch.manual_seed(0)
            st = create("rsgs", backbone("resnet20_cifar", num_classes=10, weights=SOURCE), lr=lr,
                        reset_constant=reset_constant)
            emas: List[float] = []
            track = st.update.recover_if_collapsing if reset_constant > 0 else None

            def spy(loss: torch.Tensor, kept: torch.Tensor, _track=track, _st=st) -> torch.Tensor:
                if float(kept) > 0:  # the EMA SAR compares with the threshold, before a reset forgets it
                    emas.append(float(0.9 * _st.update.ema + 0.1 * loss) if bool(_st.update.ema_set) else float(loss))
                return _track(loss, kept)  # a host sync per step: measurement only

            if track is not None:
                st.update.recover_if_collapsing = spy
            t = time.perf_counter()
            r = ctta.run(stream, st, device="cpu", progress=False, on_diverge="mark")
            rows.append({"lr": lr, "reset_constant": reset_constant, "errors": _errors(r),
                         "mean_error": r.summary.get("mean_error"), "recoveries": int(st.update.recoveries),
                         "min_ema": min(emas) if emas else None, "seconds": time.perf_counter() - t})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _old_schedule(st: Any) -> None:
    """The replaced CoSO schedule: a half cosine from the base rate to 0 over the session's train batches."""
    state = {"total": 0, "batch": 1}
    start = st.segment_start

    def segment_start(seg: Any) -> None:
        start(seg)
        if seg.kind == "train":
            state["total"], state["batch"] = seg.num_batches, seg.batch_size

    def set_lr() -> None:  # called before each train batch, with the samples learned so far in st._done
        done, total = st._done // state["batch"], max(state["total"], 1)
        factor = 0.5 * (1 + math.cos(math.pi * min(done, total) / total))
        for group, base in zip(st.optimizer.param_groups, st.base_lrs):
            group["lr"] = base * factor

    st.segment_start, st._set_lr = segment_start, set_lr


def _unshifted_schedule(st: Any) -> None:
    """The first issue-15 schedule: ``cos(99 pi e / (200 (K - 1)))`` in epoch e (the official scheduler's first step,
    which repeats epoch 0's rate, missed)."""
    def set_lr() -> None:
        e, k = st.epoch(), st._epochs
        factor = 1.0 if k <= 1 else math.cos(99 * math.pi * e / (200 * (k - 1)))
        for group, base in zip(st.optimizer.param_groups, st.base_lrs):
            group["lr"] = base * factor

    st._set_lr = set_lr


def coso(args: argparse.Namespace) -> List[Dict[str, Any]]:
    stream = make_stream("cifar10_ci", data_root=DATA, train_per_class=args.train_per_class,
                         test_per_class=args.test_per_class, epochs=args.epochs, seed=1)
    variants = {"official (now)": {},
                "before (all replaced)": {"old": True, "energy_rule": "reach", "sketch_shrink_block": False,
                                          "head_init": "keep", "orthonormal_history": True},
                "official, energy rule reach": {"energy_rule": "reach"},
                "official, textbook sketch": {"sketch_shrink_block": False},
                "official, per-batch half cosine": {"old": True},
                "official, cosine one epoch early": {"unshifted": True},
                "official, checkpoint's head (head_init keep)": {"head_init": "keep"},
                "official, H re-orthonormalised (orthonormal_history)": {"orthonormal_history": True}}
    rows = []
    for label in args.variants.split(",") if args.variants else variants:
        kw = dict(variants[label])
        old = kw.pop("old", False)
        unshifted = kw.pop("unshifted", False)
        torch.manual_seed(0)
        model = backbone("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=4, embed_dim=128,
                         num_heads=4, weights=args.vit or None)
        st = create("coso", model, **kw)
        if old:
            _old_schedule(st)
        if unshifted:
            _unshifted_schedule(st)
        t = time.perf_counter()
        r = ctta.run(stream, st, device="cpu", progress=False, on_diverge="mark")
        s = r.summary
        dims = [int(st.optimizer.historical_basis(p).shape[1]) for p in st.targets
                if st.optimizer.historical_basis(p) is not None]
        rows.append({"variant": label, **{k: s.get(k) for k in ("average_incremental_accuracy", "last_accuracy",
                                                                "forgetting")},
                     "historical_dims": dims, "seconds": time.perf_counter() - t})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["aad", "rsgs", "coso"])
    p.add_argument("--json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--corruptions", default="gaussian_noise,shot_noise,impulse_noise,contrast,brightness")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--lrs", default="1e-3", help="rsgs: learning rates to run")
    p.add_argument("--vit", default=str(Path("~/.cache/ctta-bench/models/vit_cifar_small.pt").expanduser()))
    p.add_argument("--train-per-class", type=int, default=192, help="coso: 2 x 192 = 12 batches of 32 per epoch")
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--variants", default="")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = {"aad": aad, "rsgs": rsgs, "coso": coso}[args.what](args)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
