"""Agreement of our ``lwf`` / ``ewc`` strategies with Mammoth's (aimagelab/mammoth: ``models/lwf.py`` ``Lwf``,
``models/ewc_on.py`` ``EwcOn``): the same initial weights, training batches in the same order, test images, lr,
alpha / temperature, lambda / gamma and seeds.

The reference is not part of this repository: give the root of a checkout with ``--reference`` and put kornia on
the path; this script contains none of its code. It imports the reference behind the stand-in packages of
``der_reference.py`` (whose helpers it reuses), plus the reference's ``MammothBackbone`` (``backbone/__init__.py``
without its loop importing every backbone) around our ResNet-20: ``returnt='features'`` is our
``forward_features``, ``classifier`` our last linear layer. Per task it gives the model a stand-in dataset whose
``train_loader`` yields our segment's batches in our order (images, labels, images, and LwF's stored logits once
``begin_task`` asks for them) over a task dataset that holds the images sorted by label, so that LwF's stored
logits are computed, as in Mammoth, in batches other than the training ones; then it drives it as its
``utils/training.py``: ``meta_begin_task``, ``net.train()``, ``meta_observe`` per batch, ``meta_end_task``, an
eval-mode pass over the test images of the tasks seen.

Runs per method and seed:
  ours          our default (cross-entropies over the classes seen so far)
  ours-raw      ewc only, ``mask_unseen=False``: predictions unmasked too (the same training as ours)
  ours-eval     ewc only, ``fisher_mode=eval`` (no BatchNorm update during the Fisher pass): the effect of that choice
  ours-nowarm   lwf only, ``warmup=False``: the effect of the warm-up
  ref           the reference (``set_random_seed(seed)``; neither method draws random numbers)

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=/tmp/mm_deps python benchmarks/lwf_ewc_reference.py \\
        --reference /tmp/mammoth_ref --data-root ../shared/data/cifar10 --methods lwf,ewc --seeds 0,1,2 \\
        --train-per-class 300 --test-per-class 200

Accuracies are over the classes seen so far (unseen masked, as Mammoth's class-il ``evaluate``), in %. For LwF the
script also checks, in the reference run, that the logits ``begin_task`` stores equal the model's eval-mode
outputs on each training batch (our frozen copy's computation).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import types
from argparse import Namespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adab2n_reference import batches  # noqa: E402
from der_reference import (FakeDataset, accuracies, import_reference, print_comparison,  # noqa: E402
                           print_seed_means, print_seed_table, run_ours, split_cifar10)

#: the reference's models/config/*.yaml for seq-cifar10 (lwf: alpha and softmax_temp are its parser defaults)
REF_HP = {"lwf": {"lr": 0.03, "alpha": 0.5, "softmax_temp": 2.0}, "ewc": {"lr": 0.1, "e_lambda": 10.0, "gamma": 1.0}}
OURS_HP = {"lwf": {"lr": 0.03, "alpha": 0.5, "temperature": 2.0}, "ewc": {"lr": 0.1, "ewc_lambda": 20.0, "gamma": 1.0}}
VARIANTS = {"lwf": {"ours": {}, "ours-nowarm": {"warmup": False}},
            "ewc": {"ours": {}, "ours-raw": {"mask_unseen": False}, "ours-eval": {"fisher_mode": "eval"}}}


def reference_classes(root):
    """The reference's Lwf, EwcOn and MammothBackbone (behind der_reference's stand-ins) and set_random_seed."""
    _, _, set_random_seed = import_reference(root)
    from models.ewc_on import EwcOn  # noqa: E402  (the reference's)
    from models.lwf import Lwf  # noqa: E402

    path = os.path.join(os.path.abspath(root), "backbone", "__init__.py")
    src = open(path).read().split("# import all files in the backbone folder")[0]  # not the loop importing all
    mod = types.ModuleType("reference_backbone")
    mod.__file__ = path
    exec(compile(src, path, "exec"), mod.__dict__)
    return {"lwf": Lwf, "ewc": EwcOn}, mod.MammothBackbone, set_random_seed


def mammoth_net(model, base):
    """Our classifier as a MammothBackbone: ``returnt='features'`` = forward_features, ``classifier`` = the head."""
    from ctta.backbones.classifier import last_linear

    class Net(base):
        def __init__(self):
            super().__init__()
            self.model = model
            self.classifier = last_linear(model)  # the same module (parameters() lists it once, in model's order)

        def forward(self, x, returnt="out"):
            if returnt == "features":
                return self.model.forward_features(x)
            assert returnt == "out"
            return self.model(x)

    return Net()


class TaskData:
    """One task's training set as the reference reads it: ``data``, ``__getitem__(j)[2]`` (the image without
    augmentation), ``logits`` / ``extra_return_fields`` (set by LwF's ``begin_task``)."""

    def __init__(self, x, y):
        self.data, self.targets, self.logits, self.extra_return_fields = x, y, None, ()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, j):
        return self.data[j], self.targets[j], self.data[j]


class Loader:
    """The task's train_loader: batches of dataset indices in our segment's order."""

    def __init__(self, dataset, index_batches):
        self.dataset, self.index_batches = dataset, index_batches

    def __len__(self):
        return len(self.index_batches)

    def __iter__(self):
        d = self.dataset
        for idx in self.index_batches:
            out = (d.data[idx], d.targets[idx], d.data[idx])
            if "logits" in d.extra_return_fields:
                out += (d.logits[idx],)
            yield out


class TaskDataset(FakeDataset):
    """der_reference's task layout plus the current task's ``train_loader``."""

    train_loader = None


def task_loader(seg):
    """A Loader over ``seg`` (one epoch): the dataset sorted by label (stable), batches in the segment's order."""
    bs, x, y = batches(seg)
    assert seg.meta.get("epochs", 1) == 1, "the stand-in dataset holds one epoch"
    order = torch.sort(y, stable=True).indices  # dataset position -> segment position
    where = torch.empty_like(order)
    where[order] = torch.arange(len(order))  # segment position -> dataset position
    data = TaskData(x[order], y[order])
    b = seg.batch_size
    return Loader(data, [where[i:i + b] for i in range(0, len(y), b)])


def run_reference(method, stream, model, seed, ref):
    classes, base, set_random_seed = ref
    set_random_seed(seed)
    hp = REF_HP[method]
    args = Namespace(lr=hp["lr"], optimizer="sgd", optim_wd=0.0, optim_mom=0.0, optim_nesterov=False, label_perc=1,
                     nowand=True, non_verbose=True, n_epochs=1, batch_size=32,
                     **{k: v for k, v in hp.items() if k != "lr"})
    fake = TaskDataset()
    m = classes[method](mammoth_net(model, base), torch.nn.functional.cross_entropy, args, None, dataset=fake)
    m.device = torch.device("cpu")
    out, stored_gap = [], []
    for seg in stream.segments:
        if seg.kind == "train":
            fake.train_loader = task_loader(seg)
            m.meta_begin_task(fake)
            d = fake.train_loader.dataset
            if d.logits is not None:  # LwF: stored logits vs the eval-mode model on each training batch
                m.net.eval()
                with torch.no_grad():
                    gap = max(float((m.net(xb) - lb).abs().max()) for xb, _, _, lb in fake.train_loader)
                m.net.train()
                stored_gap.append(gap)
            m.net.train()
            for data in fake.train_loader:
                extra = {"logits": data[3]} if len(data) > 3 else {}
                m.meta_observe(data[0], data[1], data[2], **extra)
            m.meta_end_task(fake)
        else:
            bs, x, y = batches(seg)
            m.net.eval()
            with torch.no_grad():
                out.append((torch.cat([m(xb) for xb, _ in bs]), y))
            m.net.train()
    return out, stored_gap


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="root of the reference checkout")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--methods", default="lwf,ewc")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--runs", default=None, help="comma-separated subset of the runs above (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ref = reference_classes(args.reference)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    acc, names = {}, {}
    for method in methods:
        names[method] = [r for r in list(VARIANTS[method]) + ["ref"] if args.runs is None or r in args.runs.split(",")]
        for seed in seeds:
            stream, init = split_cifar10(args, seed)
            out, secs, gap = {}, {}, []
            for r in names[method]:
                t0 = time.time()
                model = copy.deepcopy(init)
                if r == "ref":
                    out[r], gap = run_reference(method, stream, model, seed, ref)
                else:
                    out[r] = run_ours(method, stream, model, seed, **OURS_HP[method], **VARIANTS[method][r])
                secs[r] = time.time() - t0
                acc[(method, seed, r)] = accuracies(out[r])
            print_seed_table(f"{method}, seed {seed}", acc, (method, seed), names[method], secs)
            same = "ours" if "ours" in out else "ours-raw"
            if same in out and "ref" in out:
                print_comparison(f"{same} vs ref", out[same], out["ref"])
            if gap:
                print("ref: stored logits vs eval-mode outputs on the training batches, max |difference| per task "
                      "1-4: " + " / ".join(f"{g:.1e}" for g in gap), flush=True)
    print_seed_means("method", [(m, names[m]) for m in methods], seeds, acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
