"""Agreement of our ``aad`` strategy with the official AaD code (Albert0147/AaD_SFDA ``tar_adaptation.py``
``train_target``): the same model, target images, batches, order, seed and hyperparameters on both sides.

The reference is not part of this repository: give the folder holding its ``tar_adaptation.py``, ``network.py``,
``loss.py`` and ``data_list.py`` with ``--reference``; this script contains none of its code, it imports it and runs
``train_target`` unchanged, replacing only what ties it to VisDA-C and CUDA:

- ``data_load``: the target loader yields our batches (images, labels, data-set indices) in our stream's order; its
  first pass (the code's bank-filling pass, eval mode) goes in index order, then one pass per epoch;
- ``network.ResBase`` / ``feat_bootleneck`` / ``feat_classifier``: netF = the shared ResNet-20 up to its pooled
  64-d features, netB = identity (our backbones have no bottleneck), netC = its last linear layer; their state dicts
  are written to a temp ``output_dir_src`` and loaded by the code itself;
- the two bank widths the code hard-codes for VisDA (``torch.randn(N, 256)``, ``torch.randn(N, 12)``) become
  (N, 64) and (N, 10); ``Tensor.cuda`` / ``Module.cuda`` are the identity (CPU);
- ``cal_acc`` (which at this commit uses an undefined ``nu``): replaced by an eval-mode pass over the target images
  that records error and argmaxes; ``args.interval = epochs`` so it runs after every epoch, as our eval does.

The target, CIFAR-10 test under gaussian_noise severity 5 from our ``sfda`` stream, is generated once and written
to ``--cache`` (.npz: images, labels, the per-epoch orders); both sides read it. Ours runs through
``ctta.strategies.create("aad", model, seed=...)`` with its configured defaults (K 5, alpha 1, beta 5, lr 1e-3,
backbone 0.1 x lr, SGD momentum 0.9 Nesterov, wd 1e-3, power 0.75; max_iter from the stream), driven batch by batch
with the stream's segments for ``segment_start``; the reference runs with its argparse defaults at our batch size
and epochs (``--max_epoch``). ``--ours-bank`` sets our strategy's ``bank_init`` (the fidelity fix).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/aad_reference.py --reference /tmp/ref_aad \\
        --weights ../shared/models/resnet20-12fca82f.th --data-root ../shared/data/cifar10 \\
        --num-samples 10000 --epochs 3 --batch-size 64 --seed 0 --cache /tmp/aad_target.npz

Prints the source model's error, then per epoch our error, the reference's, the difference and the share of
identical eval argmaxes, then the final line.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import sys
import tempfile
import time
import types

import numpy as np
import torch
from torch import nn


def build_target(args):
    """(images N x 3 x 32 x 32 float32, labels N, orders E x N, stream) from the sfda stream, cached in ``--cache``."""
    import ctta

    stream = ctta.streams.create("sfda", target="gaussian_noise", dataset="cifar10", data_root=args.data_root,
                                 severity=5, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                 num_samples=args.num_samples)
    if args.cache and os.path.exists(args.cache):
        d = np.load(args.cache)
        if d["orders"].shape == (args.epochs, args.num_samples):
            return torch.from_numpy(d["x"]), torch.from_numpy(d["y"]), torch.from_numpy(d["orders"]), stream
    adapt = [s for s in stream.segments if s.kind == "adapt"]
    x0, y0, _ = adapt[0].materialise(torch.device("cpu"))  # epoch 0's order defines the data-set index here
    where = {hashlib.sha1(x0[i].numpy().tobytes()).hexdigest(): i for i in range(len(x0))}
    orders = [torch.arange(len(x0))]
    for seg in adapt[1:]:
        xe = seg.materialise(torch.device("cpu"))[0]
        orders.append(torch.tensor([where[hashlib.sha1(xe[i].numpy().tobytes()).hexdigest()]
                                    for i in range(len(xe))]))  # KeyError: an epoch's images differ from epoch 0's
    orders = torch.stack(orders)
    if args.cache:
        np.savez(args.cache, x=x0.numpy(), y=y0.numpy(), orders=orders.numpy())
    return x0, y0, orders, stream


@torch.no_grad()
def evaluate(fn, x, bs=256):
    return torch.cat([fn(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])


def run_ours(args, make_model, x, y, orders, stream):
    import ctta

    extra = {"bank_init": args.ours_bank} if args.ours_bank else {}
    ours = ctta.strategies.create("aad", make_model(), seed=args.seed, **extra)
    preds = []
    adapt = [s for s in stream.segments if s.kind == "adapt"]
    for e in range(args.epochs):
        ours.segment_start(adapt[e])
        order = orders[e]
        for i in range(0, len(order), args.batch_size):
            ours.adapt(x[order[i:i + args.batch_size]])
        preds.append(evaluate(ours.predict, x))
        print(f"  ours      epoch {e}: error {100 * float((preds[-1] != y).float().mean()):.2f} %", flush=True)
    return preds, ours


class _Iter:
    """A loader iterator with the Python-2 ``.next()`` the reference calls."""

    def __init__(self, batches):
        self._it = iter(batches)

    def __next__(self):
        return next(self._it)

    next = __next__


class FixedLoader:
    """The reference's target loader: pass 0 in index order (bank filling), pass e + 1 in our epoch e's order."""

    def __init__(self, x, y, orders, bs):
        self.x, self.y, self.orders, self.bs, self.passes = x, y, orders, bs, 0
        self.dataset = range(len(x))

    def __len__(self):
        return -(-len(self.x) // self.bs)

    def __iter__(self):
        p, self.passes = self.passes, self.passes + 1
        order = torch.arange(len(self.x)) if p == 0 else self.orders[p - 1]
        return _Iter((self.x[idx], self.y[idx], idx) for idx in order.split(self.bs))


class RefF(nn.Module):
    """netF: the backbone up to its pooled features; its parameters exclude the last linear layer (that is netC)."""

    def __init__(self, clf):
        super().__init__()
        self.body = nn.ModuleDict({n: m for n, m in clf.net.named_children() if m is not clf.net.linear})
        object.__setattr__(self, "_clf", clf)
        self.in_features = clf.feature_dim

    def forward(self, x):
        return self._clf.forward_features(x)


class _TorchShim(types.ModuleType):
    """``torch`` for the reference module, with its VisDA bank widths (256, 12) mapped to ours."""

    def __init__(self, widths):
        super().__init__("torch")
        self._widths = widths

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, *size, **kw):
        if len(size) == 2 and size[1] in self._widths:
            size = (size[0], self._widths[size[1]])
        return torch.randn(*size, **kw)


def run_reference(args, make_model, x, y, orders):
    sys.path.insert(0, os.path.abspath(args.reference))
    import network  # noqa: E402  (the reference's)
    import tar_adaptation as ta  # noqa: E402

    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    clf = make_model()
    net_f, net_b, net_c = RefF(clf), nn.Identity(), clf.net.linear
    network.ResBase = lambda res_name: net_f
    network.feat_bootleneck = lambda type, feature_dim, bottleneck_dim: net_b
    network.feat_classifier = lambda type, class_num, bottleneck_dim: net_c
    ta.torch = _TorchShim({256: clf.feature_dim, 12: 10})
    loader = FixedLoader(x, y, orders, args.batch_size)
    ta.data_load = lambda a: {"target": loader, "test": None}
    preds = []

    def cal_acc(loader_, fea_bank, score_bank, netF, netB, netC, a, flag=False):
        preds.append(evaluate(lambda b: netC(netB(netF(b))), x))
        err = 100 * float((preds[-1] != y).float().mean())
        print(f"  reference epoch {len(preds) - 1}: error {err:.2f} %", flush=True)
        return 100 - err, ""

    ta.cal_acc = cal_acc
    src = tempfile.mkdtemp(prefix="aad_src_")
    for name, m in (("F", net_f), ("B", net_b), ("C", net_c)):
        torch.save(m.state_dict(), os.path.join(src, f"source_{name}.pt"))
    a = argparse.Namespace(max_epoch=args.epochs, interval=args.epochs, batch_size=args.batch_size, worker=0,
                           dset="visda-2017", lr=1e-3, net="resnet20", seed=args.seed, bottleneck=256, K=5,
                           epsilon=1e-5, layer="wn", classifier="bn", alpha=1.0, beta=5.0, class_num=10,
                           output_dir_src=src, name="cifar10-gn5", out_file=io.StringIO())
    torch.manual_seed(args.seed)  # as the code's __main__ (it draws nothing else from the generators here)
    np.random.seed(args.seed)
    random.seed(args.seed)
    ta.train_target(a)
    return preds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="folder with the reference's tar_adaptation.py, network.py")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--backbone", default="resnet20_cifar")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--num-samples", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="", help=".npz to write the target to once (and read it from)")
    ap.add_argument("--ours-bank", default="", help="our bank_init (source | lazy); empty: the configured default")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta

    def make_model():
        return ctta.backbones.create(args.backbone, weights=args.weights).eval()

    t0 = time.time()
    x, y, orders, stream = build_target(args)
    print(f"target: {len(x)} CIFAR-10 test images, gaussian_noise 5, {args.epochs} epochs, batch {args.batch_size}, "
          f"seed {args.seed} ({time.time() - t0:.0f} s)", flush=True)
    src = evaluate(make_model(), x)
    print(f"source model: error {100 * float((src != y).float().mean()):.2f} %", flush=True)
    t0 = time.time()
    ours, strat = run_ours(args, make_model, x, y, orders, stream)
    t1 = time.time()
    ref = run_reference(args, make_model, x, y, orders)
    t2 = time.time()
    print(f"ours: max_iter {strat.max_iter}, {strat.iteration} updates, {t1 - t0:.0f} s; reference {t2 - t1:.0f} s")
    print("| epoch | ours error % | reference error % | difference (points) | identical argmax % |")
    print("| --- | --- | --- | --- | --- |")
    for e, (po, pr) in enumerate(zip(ours, ref)):
        eo, er = 100 * float((po != y).float().mean()), 100 * float((pr != y).float().mean())
        same = 100 * float((po == pr).float().mean())
        print(f"| {'final' if e == len(ours) - 1 else e} | {eo:.2f} | {er:.2f} | {eo - er:+.2f} | {same:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
