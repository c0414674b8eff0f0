"""Agreement of our ``er_ace`` and ``adab2n`` strategies with the official AdaB²N code (lvyilin/AdaB2N, mammoth:
``models/er_ace.py`` ``ErACE``, ``models/er_ace_ada.py`` ``ErACEAda``, ``models/utils/adab2n.py``): the same
initial weights, training batches in the same order, test images, buffer size, batch sizes, lr and seeds.

The reference is not part of this repository: give the root of a checkout (holding ``models/``, ``utils/``,
``datasets/``, ``backbone/``) with ``--reference``; this script contains none of its code. It builds the reference's
``ErACE`` / ``ErACEAda`` model around the reference's ``backbone/ResNet18.py`` ``resnet18(10, nf=20)`` loaded with
our initial weights (same state-dict keys; our CIFAR-10 normalisation in front, as mammoth's transform), lets its
``ContinualModel`` swap the BatchNorms (``--nl AdaB2N``: its ``AdaB2N`` layer, kappa 0.7; ER-ACE keeps BatchNorm)
and drives it as mammoth's ``utils/training.py`` does: per task ``net.train()``, ``observe(x, y, x)`` per batch,
``end_task``, then an eval-mode pass over the test images of the tasks seen. Replaced: ``get_dataset(args)`` (its
task counts only: 5 tasks of 2 classes), and for ER-ACE the BatchNorm swap (``--nl BN`` makes ``replace_bn`` call
``BatchNorm2d(module)``, a TypeError at this commit: identity instead). No augmentation on either side (the
reference's mammoth transform crops and flips incoming and replayed images; here ``observe`` gets our batches and
the buffer no transform).

Both sides: the ``cifar10_online`` stream (index class order as seq-cifar10, 5 tasks of 2 classes, each training
image once in batches of 10), buffer 500 (reservoir), 10 replayed, SGD lr 0.03, seed s for the stream's subset and
shuffle, the initial weights (``torch.manual_seed(s)``), our strategy and the reference's generators
(``set_random_seed(s)``: buffer draws through NumPy). Random methods: compare the mean over seeds.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/adab2n_reference.py --reference /tmp/ref_adab2n \\
        --data-root ../shared/data/cifar10 --methods er_ace,adab2n --seeds 0,1 --train-per-class 500 \\
        --test-per-class 200

Prints per method and seed the accuracy on the classes seen after each task (ours masks unseen classes, as the
project does; the reference's raw class-il accuracy and the same masked), the final and average incremental
accuracy and the share of identical final argmaxes; then the means over seeds and the seed spread.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types
from argparse import Namespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TASKS, PER_TASK = 5, 2


class RefNet(nn.Module):
    """Our normalisation, then the reference's ResNet-18 (mammoth's transform normalises before its backbone)."""

    def __init__(self, normalize, net):
        super().__init__()
        self.normalize, self.net = normalize, net

    def forward(self, x):
        return self.net(self.normalize(x))


def batches(seg):
    x, y, _ = seg.materialise(torch.device("cpu"))
    return [(x[i:i + seg.batch_size], y[i:i + seg.batch_size]) for i in range(0, len(x), seg.batch_size)], x, y


def run_ours(method, stream, model, seed):
    import ctta

    ours = ctta.strategies.create(method, model, seed=seed)
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
    sys.path.insert(0, os.path.abspath(root))
    sys.path.append(os.path.join(os.path.abspath(root), "backbone"))  # appended, as its utils/main.py does
    cwd = os.getcwd()
    os.chdir(root)  # its models/__init__.py and datasets/__init__.py list their folders relative to the cwd
    try:
        import models.utils.continual_model as cm  # noqa: E402  (the reference's)
        from backbone.ResNet18 import resnet18  # noqa: E402
        from models.er_ace import ErACE  # noqa: E402
        from models.er_ace_ada import ErACEAda  # noqa: E402
        from utils.conf import set_random_seed  # noqa: E402
    finally:
        os.chdir(cwd)

    fake = types.SimpleNamespace(N_TASKS=TASKS, N_CLASSES_PER_TASK=PER_TASK)
    for mod in (cm, sys.modules["models.er_ace"], sys.modules["models.er_ace_ada"]):
        mod.get_dataset = lambda args: fake
    bn_evaluate = cm.evaluate
    cm.evaluate = lambda nl, args: (lambda m: m) if nl == "BN" else bn_evaluate(nl, args)
    return {"er_ace": ErACE, "adab2n": ErACEAda}, resnet18, set_random_seed


def run_reference(method, stream, init, normalize, seed, ref):
    classes, resnet18, set_random_seed = ref
    set_random_seed(seed)
    net = resnet18(10, nf=20)
    init = dict(init, **{k.replace("linear.", "classifier.", 1): v for k, v in init.items() if k.startswith("linear.")})
    net.load_state_dict(init)  # its ResNet also registers the head as ``classifier`` (an alias of ``linear``)
    args = Namespace(buffer_size=500, minibatch_size=10, lr=0.03, buffer_mode="reservoir", no_affine=False,
                     nl="AdaB2N" if method == "adab2n" else "BN", kappa=0.7, lambd=0.1, ada_t0=0,
                     dataset="seq-cifar10", nowand=True)
    model = classes[method](RefNet(normalize, net), F.cross_entropy, args, None)
    out = []
    for seg in stream.segments:
        bs, x, y = batches(seg)
        if seg.kind == "train":
            model.net.train()
            for xb, yb in bs:
                model.observe(xb, yb, xb)
            model.end_task(None)
        else:
            model.net.eval()
            with torch.no_grad():
                out.append((torch.cat([model(xb) for xb, _ in bs]), y))
            model.net.train()
    return out


def layer_check(root):
    """One AdaB²N layer of each side on the same input, task ids and weights: (output, running mean, running var,
    regulariser) largest differences after 3 training forwards of a second-task batch (6 + 4 samples of tasks 0, 1)."""
    from ctta.strategies.common.adab2n_norm import AdaB2NBatchNorm
    from models.utils.adab2n import AdaB2N  # the reference's (imported by import_reference)

    gen = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(8)
    theirs = AdaB2N(bn, num_tasks=TASKS, num_classes_per_task=PER_TASK, kappa=0.7)
    ours = AdaB2NBatchNorm.from_batchnorm(bn, kappa=0.7, num_tasks=TASKS)
    with torch.no_grad():
        w = torch.randn(TASKS, generator=gen)
        theirs.task_weight.copy_(w)
        ours.task_weight.copy_(w)
    theirs.end_task()  # second task
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 2, 3, 2, 3])
    tasks = labels // PER_TASK
    idx, inv, cnt = torch.unique(tasks, return_inverse=True, return_counts=True)
    ext = labels.new_zeros(2)
    ext[idx] = cnt
    diffs = []
    for _ in range(3):
        x = torch.randn(10, 8, 4, 4, generator=gen) * 2 + 1
        theirs.set_counts(idx[inv], cnt[inv], ext)
        ours.set_tasks(tasks, torch.bincount(tasks, minlength=2))
        a, b = theirs(x).detach(), ours(x).detach()
        diffs.append((float((a - b).abs().max()), float((theirs.running_mean - ours.running_mean).abs().max()),
                      float((theirs.running_var / ours.running_var).max()), float((theirs.loss - ours.reg_loss).detach())))
    return diffs


def summary(ours, ref):
    """Per task: (ours acc, reference raw acc, reference masked acc, identical argmax %, max |logit difference| on
    the seen classes)."""
    rows = []
    for t, ((lo, y), (lr_, _)) in enumerate(zip(ours, ref)):
        seen = (t + 1) * PER_TASK
        masked = lr_.clone()
        masked[:, seen:] = float("-inf")
        ao, ar, am = lo.argmax(1), lr_.argmax(1), masked.argmax(1)
        rows.append((100 * float((ao == y).float().mean()), 100 * float((ar == y).float().mean()),
                     100 * float((am == y).float().mean()), 100 * float((ao == am).float().mean()),
                     float((lo[:, :seen] - lr_[:, :seen]).abs().max())))
    return np.array(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="root of the reference checkout")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--methods", default="er_ace,adab2n")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta

    ref = import_reference(args.reference)
    for k, d in enumerate(layer_check(args.reference)):
        print(f"AdaB2N layer, forward {k}: output {d[0]:.1e}, running mean {d[1]:.1e}, running var reference / ours "
              f"{d[2]:.5f} (batch m = 160: (m-1)/m = {159 / 160:.5f}), regulariser reference - ours {d[3]:+.1e}")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for method in args.methods.split(","):
        for seed in seeds:
            stream = ctta.streams.create("cifar10_online", data_root=args.data_root, seed=seed,
                                         class_order=list(range(10)), train_per_class=args.train_per_class,
                                         test_per_class=args.test_per_class)
            torch.manual_seed(seed)
            model = ctta.backbones.create("resnet18_reduced", num_classes=10)
            init = {k: v.clone() for k, v in model.net.state_dict().items()}
            t0 = time.time()
            ours = run_ours(method, stream, model, seed)
            t1 = time.time()
            theirs = run_reference(method, stream, init, ctta.backbones.create("resnet18_reduced").normalize, seed,
                                   ref)
            t2 = time.time()
            rows = summary(ours, theirs)
            results[(method, seed)] = rows
            print(f"\n### {method}, seed {seed} (ours {t1 - t0:.0f} s, reference {t2 - t1:.0f} s)")
            print("| after task | ours acc % | reference acc % (raw) | reference acc % (unseen masked) | "
                  "identical argmax % | max abs(logit difference) |")
            print("| --- | --- | --- | --- | --- | --- |")
            for t, r in enumerate(rows):
                print(f"| {t} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.1e} |", flush=True)
    print("\n### Mean over seeds " + ",".join(map(str, seeds)) + " (per-seed values in brackets)")
    print("| method | final acc ours | final acc reference | difference | avg incremental ours | "
          "avg incremental reference (masked) | final identical argmax % |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method in args.methods.split(","):
        rs = [results[(method, s)] for s in seeds]
        fo, fr = [r[-1, 0] for r in rs], [r[-1, 2] for r in rs]
        ao, ar = [r[:, 0].mean() for r in rs], [r[:, 2].mean() for r in rs]
        same = [r[-1, 3] for r in rs]

        def cell(v):
            return f"{np.mean(v):.2f} ({' / '.join(f'{u:.2f}' for u in v)})"

        print(f"| {method} | {cell(fo)} | {cell(fr)} | {np.mean(fo) - np.mean(fr):+.2f} | {cell(ao)} | {cell(ar)} | "
              f"{cell(same)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
