"""Agreement of our ``gdumb`` strategy with Mammoth's (aimagelab/mammoth: ``models/gdumb.py`` ``GDumb`` /
``fit_buffer``, ``utils/buffer.py`` ``Buffer``, ``utils/augmentations.py`` ``cutmix_data``): the same initial
weights, training batches in the same order, test images, buffer size, batch size, lr schedule, cutmix and seeds.

The reference is not part of this repository: give the root of a checkout with ``--reference`` and put kornia on
the path; it is imported behind the stand-in packages of ``der_reference.py`` and driven as there (per task
``meta_begin_task``, ``meta_observe`` per batch, ``meta_end_task``, then an eval pass over the tasks seen). Mammoth
retrains only after the last task, from a network it builds anew; to score every task, its ``end_task`` is replaced
by a call of its own ``fit_buffer`` at every task end, on a copy of the initial weights both sides share (our ResNet-20
from scratch under ``torch.manual_seed(seed)``, no augmentation on either side). Mammoth's settings (best_args.py
seq-cifar10 buffer 500: maxlr 0.05, minlr 5e-4, momentum 0.9, wd 1e-6, cutmix alpha 1 with probability 0.5, its
batch 32, no clipping) on both sides; the fitting epochs are shortened (``--epochs``).

Per seed, four runs:
  ours            our strategy, the paper's greedy class-balanced sampler (the only difference from Mammoth)
  ours-reservoir  our strategy with ``sampler: reservoir`` (Mammoth's buffer)
  ref-shared      the reference with its NumPy / torch draws (reservoir, ``get_data``'s permutation, cutmix's
                  u / lam / box centre / partner permutation) answered from our generators as ours draws them: the
                  same computation as ours-reservoir, to compare logit by logit
  ref             the reference with its own draws (``set_random_seed(seed)``): compare the means over seeds

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=/tmp/mm_deps python benchmarks/gdumb_reference.py \\
        --reference /tmp/mammoth_ref --data-root ../shared/data/cifar10 --seeds 0,1,2 --epochs 10

Accuracies are over the classes seen so far (unseen masked, as Mammoth's class-il ``evaluate``), in %.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import types
from argparse import Namespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from der_reference import (FakeDataset, SharedDraws, accuracies, import_reference, mammoth_loop,  # noqa: E402
                           print_comparison, print_seed_means, print_seed_table, run_ours, split_cifar10)

MAMMOTH = {"maxlr": 0.05, "minlr": 5e-4, "momentum": 0.9, "weight_decay": 1e-6, "cutmix_alpha": 1.0,
           "cutmix_prob": 0.5, "batch_size": 32, "clip": 0.0}  # ours with Mammoth's seq-cifar10 values


class TorchWith(types.SimpleNamespace):
    """``torch`` with some functions replaced (the reference module's global ``torch`` during a shared run)."""

    def __getattr__(self, name):
        return getattr(torch, name)


def run_reference(stream, model, seed, args, shared):
    """Mammoth's GDumb through the stream (its fit_buffer at every task end): the logits of every eval segment."""
    _, buffer_module, set_random_seed = import_reference(args.reference)
    sys.modules["backbone"].get_backbone = lambda a: None  # the stand-in package lacks it; end_task below builds none
    import models.gdumb as gdumb_module  # noqa: E402  (the reference's)
    import utils.augmentations as aug_module  # noqa: E402

    set_random_seed(seed)
    margs = Namespace(buffer_size=args.buffer_size, minibatch_size=32, batch_size=32, lr=0.0, n_epochs=1,
                      optimizer="sgd", optim_wd=1e-6, optim_mom=0.9, optim_nesterov=False, maxlr=0.05, minlr=5e-4,
                      fitting_epochs=args.epochs, cutmix_alpha=1.0, debug_mode=False, label_perc=1, nowand=True,
                      non_verbose=True)
    saved = (buffer_module.np, buffer_module.Buffer.add_data, aug_module.np, aug_module.torch)
    if shared:
        draws = SharedDraws(seed)  # the torch stream: reservoir variates, permutations (ours: strategy.generator)
        rng = np.random.default_rng(seed)  # the NumPy stream: cutmix's scalars (ours: strategy._rng)
        buffer_module.np = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
        buffer_module.np.random = types.SimpleNamespace(randint=draws.randint, choice=draws.choice)
        original_add = saved[1]

        def add_data(self, examples, **kw):
            draws.offer(self.num_seen_examples, examples.shape[0])
            return original_add(self, examples, **kw)

        buffer_module.Buffer.add_data = add_data
        aug_module.np = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
        aug_module.np.random = types.SimpleNamespace(rand=lambda: rng.random(), beta=lambda a, b: rng.beta(a, b),
                                                     randint=lambda n: rng.integers(n))
        aug_module.torch = TorchWith(randperm=lambda n: torch.randperm(n, generator=draws.gen))
    initial = copy.deepcopy(model)

    def end_task(self, dataset):  # Mammoth's fit_buffer at every task end, from the shared initial weights
        self.net = copy.deepcopy(initial).train()  # as a freshly built backbone (fit_buffer sets no mode)
        gdumb_module.fit_buffer(self, self.args.fitting_epochs)

    try:
        fake = FakeDataset()
        m = gdumb_module.GDumb(model, torch.nn.functional.cross_entropy, margs, None, dataset=fake)
        m.end_task = types.MethodType(end_task, m)
        m.device = torch.device("cpu")
        out = mammoth_loop(m, stream, fake)
    finally:
        buffer_module.np, buffer_module.Buffer.add_data, aug_module.np, aug_module.torch = saved
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="root of the reference checkout")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="ours,ours-reservoir,ref-shared,ref")
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--buffer-size", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=10, help="fitting epochs at every task end (Mammoth: 250)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    seeds = [int(s) for s in args.seeds.split(",")]
    runs = args.runs.split(",")
    acc = {}
    for seed in seeds:
        stream, init = split_cifar10(args, seed)
        out, secs = {}, {}
        for r in runs:
            t0 = time.time()
            model = copy.deepcopy(init)
            if r.startswith("ours"):
                sampler = "reservoir" if r == "ours-reservoir" else "greedy"
                out[r] = run_ours("gdumb", stream, model, seed, buffer_size=args.buffer_size, epochs=args.epochs,
                                  sampler=sampler, **MAMMOTH)
            else:
                out[r] = run_reference(stream, model, seed, args, shared=(r == "ref-shared"))
            secs[r] = time.time() - t0
            acc[("gdumb", seed, r)] = accuracies(out[r])
        print_seed_table(f"gdumb, seed {seed}", acc, ("gdumb", seed), runs, secs)
        if "ours-reservoir" in out and "ref-shared" in out:
            print_comparison("ours-reservoir vs ref-shared", out["ours-reservoir"], out["ref-shared"])
    print_seed_means("method", [("gdumb", runs)], seeds, acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
