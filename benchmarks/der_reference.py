"""Agreement of our ``der`` / ``derpp`` strategies with Mammoth's (aimagelab/mammoth: ``models/der.py`` ``Der``,
``models/derpp.py`` ``Derpp``, ``utils/buffer.py`` ``Buffer``): the same initial weights, training batches in the
same order, test images, buffer size, batch sizes, lr, alpha / beta and seeds.

The reference is not part of this repository: give the root of a checkout (holding ``models/``, ``utils/``) with
``--reference`` and put kornia on the path (its ``ContinualModel`` imports it); this script contains none of its
code. It imports the reference's ``Der`` / ``Derpp`` (with its ``ContinualModel`` and ``Buffer``) with stand-in
``models`` / ``datasets`` / ``backbone`` packages (their ``__init__`` import every model and dataset, some of which
download weights), a stand-in dataset giving the task counts (5 tasks of 2 classes, class-il), no transform, and
drives it as its ``utils/training.py`` does: per task ``meta_begin_task`` (a fresh SGD), ``net.train()``,
``meta_observe(x, y, x)`` per batch, ``meta_end_task``; then an eval-mode pass over the test images of the tasks
seen. The backbone on both sides is our ResNet-20 (from scratch, ``torch.manual_seed(seed)``) with our CIFAR
normalisation in front; no augmentation on either side (the reference's seq-cifar10 crops and flips the incoming
and the replayed images).

Per method and seed, three runs:
  ours          our strategy with its defaults
  ref-shared    the reference with its NumPy draws (reservoir ``np.random.randint``, ``get_data``'s
                ``np.random.choice``) answered from our strategy's torch generator exactly as our buffer draws them:
                the same computation as ours, to compare logit by logit
  ref           the reference with its own draws (``set_random_seed(seed)``): compare the means over seeds

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=/tmp/mm_deps python benchmarks/der_reference.py \\
        --reference /tmp/mammoth_ref --data-root ../shared/data/cifar10 --methods der,derpp --seeds 0,1,2 \\
        --train-per-class 300 --test-per-class 200

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
from typing import Any, List, Tuple

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adab2n_reference import batches  # noqa: E402  (one segment's batches, as that script feeds both sides)

TASKS, PER_TASK = 5, 2
HP = {"der": {"alpha": 0.3}, "derpp": {"alpha": 0.2, "beta": 0.5}}  # seq-cifar10, buffer 500 (best_args.py)


def run_ours(method, stream, model, seed, **hp):
    """Our strategy through the stream: the logits of every eval segment with its labels."""
    import ctta

    ours = ctta.strategies.create(method, model, seed=seed, **hp)
    out = []
    for seg in stream.segments:
        ours.segment_start(seg)
        bs, x, y = batches(seg)
        if seg.kind == "train":
            for xb, yb in bs:
                ours.learn(xb, yb)
        else:
            out.append((torch.cat([ours.predict(xb) for xb, _ in bs]), y))
        ours.segment_end(seg)
    return out


def import_reference(root):
    """The reference's Der, Derpp, its buffer module and set_random_seed, behind stand-in package roots."""
    root = os.path.abspath(root)
    sys.path.insert(0, root)
    for name in ("models", "datasets", "backbone"):  # bare packages: their __init__ import every model / dataset
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(root, name)]
        sys.modules[name] = pkg
    sys.modules["datasets"].get_dataset = lambda args: None
    sys.modules["datasets"].get_dataset_names = lambda *a, **k: []
    sys.modules["datasets"].get_dataset_config_names = lambda *a, **k: []
    sys.modules["models"].get_model_names = lambda *a, **k: []
    sys.modules["backbone"].REGISTERED_BACKBONES = {}
    import utils.buffer as buffer_module  # noqa: E402  (the reference's)
    from models.der import Der  # noqa: E402
    from models.derpp import Derpp  # noqa: E402
    from utils.conf import set_random_seed  # noqa: E402

    return {"der": Der, "derpp": Derpp}, buffer_module, set_random_seed


class FakeDataset:
    """What ContinualModel reads of a seq-cifar10 dataset: the task layout and the setting."""

    N_CLASSES, N_TASKS, N_CLASSES_PER_TASK, SETTING = TASKS * PER_TASK, TASKS, PER_TASK, "class-il"

    def get_offsets(self, task=None):
        return task * PER_TASK, (task + 1) * PER_TASK


class SharedDraws:
    """Answers the reference buffer's NumPy draws as our ReservoirBuffer draws them from a torch generator: per
    offered batch one ``torch.rand`` (j = floor(u * (t + 1)) for arrival t, computed in float32 as ours), per sample
    request ``randperm(n)[:size]``."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.start, self.j = 0, None

    def offer(self, seen, b):
        """Called at the start of ``add_data``: draw this batch's reservoir variates."""
        t = torch.arange(seen, seen + b)
        u = torch.rand(b, generator=self.gen)
        self.start, self.j = seen, torch.minimum((u * (t + 1).to(u.dtype)).long(), t)

    def randint(self, low, high):
        return int(self.j[high - 1 - self.start])  # the reservoir asks randint(0, t + 1) for arrival t

    def choice(self, n, size, replace=True):
        assert not replace
        return torch.randperm(n, generator=self.gen)[:size].numpy()


def mammoth_loop(m: Any, stream: Any, fake: Any) -> List[Tuple[Tensor, Tensor]]:
    """Drive a Mammoth model as its ``utils/training.py``: per train segment ``meta_begin_task``, ``meta_observe`` per
    batch, ``meta_end_task``; per test segment an eval-mode pass. Returns (logits, labels) per test segment."""
    out = []
    for seg in stream.segments:
        bs, x, y = batches(seg)
        if seg.kind == "train":
            m.meta_begin_task(fake)
            m.net.train()
            for xb, yb in bs:
                m.meta_observe(xb, yb, xb)
            m.meta_end_task(fake)
        else:
            m.net.eval()
            with torch.no_grad():
                out.append((torch.cat([m(xb) for xb, _ in bs]), y))
            m.net.train()
    return out


def run_reference(method, stream, model, seed, ref, shared, buffer_size=500, batch=32):
    classes, buffer_module, set_random_seed = ref
    set_random_seed(seed)
    args = Namespace(buffer_size=buffer_size, minibatch_size=batch, lr=0.03, optimizer="sgd", optim_wd=0.0,
                     optim_mom=0.0, optim_nesterov=False, label_perc=1, nowand=True, non_verbose=True,
                     **HP[method])
    draws = SharedDraws(seed) if shared else None
    original_np, original_add = buffer_module.np, buffer_module.Buffer.add_data
    if shared:
        rnd = types.SimpleNamespace(randint=draws.randint, choice=draws.choice)
        buffer_module.np = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
        buffer_module.np.random = rnd

        def add_data(self, examples, **kw):
            draws.offer(self.num_seen_examples, examples.shape[0])
            return original_add(self, examples, **kw)

        buffer_module.Buffer.add_data = add_data
    try:
        fake = FakeDataset()
        m = classes[method](model, torch.nn.functional.cross_entropy, args, None, dataset=fake)
        m.device = torch.device("cpu")
        out = mammoth_loop(m, stream, fake)
    finally:
        buffer_module.np, buffer_module.Buffer.add_data = original_np, original_add
    return out


def accuracies(run):
    """Per task: accuracy % on the seen classes (the others masked)."""
    accs = []
    for t, (lo, y) in enumerate(run):
        z = lo.clone()
        z[:, (t + 1) * PER_TASK:] = float("-inf")
        accs.append(100 * float((z.argmax(1) == y).float().mean()))
    return np.array(accs)


def compare(a, b):
    """Per task: identical argmax % (seen classes) and max |logit difference| on the seen classes."""
    rows = []
    for t, ((la, _), (lb, _)) in enumerate(zip(a, b)):
        s = (t + 1) * PER_TASK
        rows.append((100 * float((la[:, :s].argmax(1) == lb[:, :s].argmax(1)).float().mean()),
                     float((la[:, :s] - lb[:, :s]).abs().max())))
    return np.array(rows)


def split_cifar10(args, seed):
    """(stream, initial model) of one seed's run: Split CIFAR-10 in index class order, a from-scratch ResNet-20
    drawn under ``torch.manual_seed(seed)`` (each side then trains its own deep copy)."""
    import ctta

    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=seed, class_order=list(range(10)),
                                 train_per_class=args.train_per_class, test_per_class=args.test_per_class)
    torch.manual_seed(seed)
    return stream, ctta.backbones.create("resnet20_cifar", num_classes=10)


def print_seed_table(title, acc, key, runs, secs):
    """One seed's accuracy after every task, a column per run; ``acc[(*key, run)]`` holds the per-task values."""
    print(f"\n### {title} (" + ", ".join(f"{r} {secs[r]:.0f} s" for r in runs) + ")")
    print("| after task | " + " | ".join(f"{r} acc %" for r in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    for t in range(TASKS):
        print(f"| {t} | " + " | ".join(f"{acc[(*key, r)][t]:.2f}" for r in runs) + " |")


def print_comparison(label, a, b, what="logit"):
    """Per task: identical argmax % and the largest |output difference| between two runs' eval outputs."""
    c = compare(a, b)
    print(f"{label}, per task: identical argmax % " + " / ".join(f"{v:.2f}" for v in c[:, 0]) +
          f"; max |{what} difference| " + " / ".join(f"{v:.1e}" for v in c[:, 1]), flush=True)


def print_seed_means(column, groups, seeds, acc):
    """Mean over seeds (per-seed values in brackets) of average incremental and final accuracy; ``groups``:
    (name, runs) pairs, ``acc[(name, seed, run)]`` the per-task accuracies."""
    print("\n### Mean over seeds " + ",".join(map(str, seeds)) + " (per-seed values in brackets)")
    print(f"| {column} | run | average incremental accuracy | final accuracy |")
    print("|---|---|---|---|")

    def cell(v):
        return f"{np.mean(v):.2f} ({' / '.join(f'{u:.2f}' for u in v)})"

    for name, runs in groups:
        for r in runs:
            a = [acc[(name, s, r)].mean() for s in seeds]
            f = [acc[(name, s, r)][-1] for s in seeds]
            print(f"| {name} | {r} | {cell(a)} | {cell(f)} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="root of the reference checkout")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--methods", default="der,derpp")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="ours,ref-shared,ref")
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ref = import_reference(args.reference)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = args.runs.split(",")
    acc = {}
    methods = args.methods.split(",")
    for method in methods:
        for seed in seeds:
            stream, init = split_cifar10(args, seed)
            out, secs = {}, {}
            for r in runs:
                t0 = time.time()
                model = copy.deepcopy(init)
                if r == "ours":
                    out[r] = run_ours(method, stream, model, seed)
                else:
                    out[r] = run_reference(method, stream, model, seed, ref, shared=(r == "ref-shared"))
                secs[r] = time.time() - t0
                acc[(method, seed, r)] = accuracies(out[r])
            print_seed_table(f"{method}, seed {seed}", acc, (method, seed), runs, secs)
            if "ours" in out and "ref-shared" in out:
                print_comparison("ours vs ref-shared", out["ours"], out["ref-shared"])
    print_seed_means("method", [(m, runs) for m in methods], seeds, acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
