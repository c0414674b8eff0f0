"""Agreement of our ``fsa`` strategy with the official FSA code (aresPanos/fsa ``src/methods/cil_trainer.py``
``CIL_Trainer``, ``src/utils.py`` ``compute_lda_head``, ``src/cnn/efficientnet.py`` ``EfficientNet`` /
``FilmEfficientNet``, ``src/cnn/features.py`` ``FilmAdapter``): the same EfficientNet-B0 weights, images, batches,
class order and seed on both sides.

The reference is not part of this repository: give its ``src/`` folder with ``--reference``; this script contains
none of its code. It builds the reference's ``CIL_Trainer`` and runs its ``train_learner`` (``base_train``: Adam
on the body, or on the FiLM adapter, + a linear head over the first session's classes, dropout 0.5) and, after each
session, its ``test_cl`` (features of every training image seen so far -> ``compute_lda_head`` -> its ``test_acc``),
replacing only what ties it to its data, downloads and hardware:

- the networks: ``EfficientNet.from_name`` / ``FilmEfficientNet.from_name('efficientnet-b0')`` (its own classes,
  no download) loaded with the weights of our timm ``tf_efficientnet_b0`` (same TF "same" padding and BN eps; the
  state dict is mapped tensor by tensor, in module order, with equal shapes), checked to give the same features;
- ``dataloader.data_utils`` (TensorFlow datasets), ``loguru``: stand-ins; ``.cuda()`` is the identity (CPU);
- the loaders: lists of our stream's batches (images normalised as our backbone does: the stand-in transform),
  labels as positions in our class order (the reference's ``base_class`` head is over positions 0..1);
- its linear head starts from our head's rows of the first session's classes, and ``torch.manual_seed`` is set
  before training on both sides, so the dropout masks agree;
- ``film_params = None`` in ``mode=full``: the official ``test_acc`` reads ``self.film_params``, which only its
  FiLM path sets (without it, FSA without FiLM stops with an AttributeError at the first test).

The shared weights: a seeded random ``tf_efficientnet_b0``, optionally trained ``--pretrain-steps`` AdamW steps on
CIFAR-10 train images outside the stream's train subset (``--calib-per-class`` per class), whose BatchNorm statistics
are then set by one pass over those images; written to ``--weights-out``.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/fsa_reference.py --reference /tmp/fsa_ref/src \\
        --data-root ../shared/data/cifar10 --train-per-class 500 --test-per-class 200 --epochs 2 --modes frozen,film,full

Prints per mode and session both accuracies (per image; and the reference's own batch-averaged figure), the share
of identical argmaxes and the largest |logit difference| over the seen classes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types
from argparse import Namespace
from typing import Dict, List, Tuple

import torch
from torch import nn

BACKBONE = "tf_efficientnet_b0"


def shared_weights(args, stream) -> str:
    """A seeded random tf_efficientnet_b0 with BN statistics from images outside the stream's train subset."""
    import ctta
    from ctta.streams.datasets import load_cifar
    from ctta.streams.incremental import class_indices

    torch.manual_seed(args.seed)
    model = ctta.backbones.create(BACKBONE, num_classes=10)
    train = load_cifar("cifar10", args.data_root, train=True)
    taken = class_indices(train, range(10), args.train_per_class, args.seed, "train")
    free = torch.ones(len(train.labels), dtype=torch.bool)
    free[taken] = False
    g = torch.Generator().manual_seed(12345)
    idx = torch.cat([torch.nonzero(free & (train.labels == c)).flatten()[
        torch.randperm(int((free & (train.labels == c)).sum()), generator=g)[:args.calib_per_class]] for c in range(10)])
    x = train.images[idx]
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    if args.pretrain_steps:  # a brief supervised pass, so the features are less chaotic than a random net's
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        model.train()
        for step in range(args.pretrain_steps):
            i = torch.randint(len(idx), (64,), generator=g)
            nn.functional.cross_entropy(model(x[i]), train.labels[idx][i].long()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in torch.randperm(len(idx), generator=g).split(250):
            model(x[i])
    for m in bns:
        m.momentum = 0.1
    torch.save(model.net.state_dict(), args.weights_out)
    return args.weights_out


def make_ours(args, weights: str):
    import ctta

    return ctta.backbones.create(BACKBONE, num_classes=10, weights=weights, bn_momentum=args.bn_momentum,
                                 drop_path_rate=args.drop_connect)


def map_state(timm_state: Dict[str, torch.Tensor], ref: nn.Module) -> Dict[str, torch.Tensor]:
    """timm tf_efficientnet_b0 tensors -> the reference's names: both list stem, blocks (expand, dw, SE, project)
    and head in the same module order; checked by shape and tensor kind."""
    src = [(k, v) for k, v in timm_state.items() if not k.startswith("classifier.")]
    dst = [(k, v) for k, v in ref.state_dict().items() if not k.startswith("_fc.")]
    assert len(src) == len(dst), (len(src), len(dst))
    out = {}
    for (ks, vs), (kd, vd) in zip(src, dst):
        assert vs.shape == vd.shape and ks.rsplit(".", 1)[1] == kd.rsplit(".", 1)[1], (ks, kd, vs.shape, vd.shape)
        out[kd] = vs.clone()
    return out


def install_reference(path: str) -> None:
    """Put the reference on sys.path with stand-ins for its TensorFlow data utilities and loguru; CPU ``.cuda``."""
    sys.path.insert(0, os.path.abspath(path))
    du = types.ModuleType("dataloader.data_utils")
    du.set_up_datasets = lambda a: a
    pkg = types.ModuleType("dataloader")
    pkg.data_utils = du
    sys.modules.update({"dataloader": pkg, "dataloader.data_utils": du})
    lg = types.ModuleType("loguru._logger")
    lg.Logger = object
    sys.modules.update({"loguru": types.ModuleType("loguru"), "loguru._logger": lg})
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self


class Log:
    def info(self, *a, **k) -> None:
        pass


class EpochLoader:
    """Iterated once per epoch by ``train_learner``: the stream's batches of that epoch."""

    def __init__(self, epochs: List[List[Tuple[torch.Tensor, torch.Tensor]]]):
        self.epochs, self.i = epochs, 0

    def __iter__(self):
        self.i += 1
        return iter(self.epochs[self.i - 1])


class Capture(nn.Module):
    """The reference's criterion, recording the logits it is given (those of ``test_acc``)."""

    def __init__(self):
        super().__init__()
        self.ce, self.logits = nn.CrossEntropyLoss(), []

    def forward(self, logits, labels):
        self.logits.append(logits.detach().clone())
        return self.ce(logits, labels)


def run_ours(args, stream, model, mode: str):
    import ctta

    ours = ctta.strategies.create("fsa", model, mode=mode, seed=args.seed)
    head = model.net.get_classifier()
    head0 = (head.weight.detach().clone(), head.bias.detach().clone())
    torch.manual_seed(args.seed)
    train, test, out = [], [], []
    for seg in stream.segments:
        ours.segment_start(seg)
        x, y, _ = seg.materialise(torch.device("cpu"))
        if seg.kind == "train":
            train.append((x, y))
            for i in range(0, len(x), seg.batch_size):
                ours.learn(x[i:i + seg.batch_size], y[i:i + seg.batch_size])
        else:
            test.append((x, y))
            with torch.no_grad():
                out.append(torch.cat([ours.predict(x[i:i + 256]) for i in range(0, len(x), 256)]))
        ours.segment_end(seg)
    return train, test, out, head0


def run_reference(args, stream, weights, mode, train, test, head0):
    from methods import cil_trainer
    from cnn.efficientnet import EfficientNet, FilmEfficientNet

    timm_state = torch.load(weights)
    norm = make_ours(args, weights).normalize

    def build(cls):
        net = cls.from_name("efficientnet-b0", num_classes=0, drop_connect_rate=args.drop_connect,
                            batch_norm_momentum=1 - args.bn_momentum)
        missing, unexpected = net.load_state_dict(map_state(timm_state, net), strict=False)
        assert all(k.startswith("_fc.") for k in missing) and not unexpected, (missing, unexpected)
        return net

    def film_extractor():
        net = build(FilmEfficientNet)
        for p in net.parameters():
            p.requires_grad = False
        return net

    cil_trainer.efficientnet = lambda *a, **k: build(EfficientNet)
    if args.ref_lda_float64:  # its compute_lda_head on float64 features (its float32 Cholesky can fail), float32 out
        lda = cil_trainer.compute_lda_head

        def lda64(f, y, a):
            torch.set_default_dtype(torch.float64)  # its eye / zeros
            try:
                return tuple(v.float() for v in lda(f.double(), y, a))
            finally:
                torch.set_default_dtype(torch.float32)

        cil_trainer.compute_lda_head = lda64
    cil_trainer.create_feature_extractor = film_extractor
    order = list(stream.spec["class_order"])
    sessions = stream.spec["sessions"]
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    ref_args = Namespace(use_film=mode == "film", device=torch.device("cpu"), base_class=len(sessions[0]),
                         num_classes=len(order), sessions=len(sessions), base_lr=args.lr, epochs_base=args.epochs,
                         few_shots=False, fscil=False, seed=args.seed, dir_save=args.work, dataset="cifar10")
    trainer = cil_trainer.CIL_Trainer(ref_args, Log())
    with torch.no_grad():  # our head's initial rows of the first-session classes
        trainer.linear_head.weight.copy_(head0[0][sessions[0]])
        trainer.linear_head.bias.copy_(head0[1][sessions[0]])
    trainer.criterion = Capture()

    def batches(x, y, bs):
        return [(norm(x[i:i + bs]), position[y[i:i + bs]]) for i in range(0, len(x), bs)]

    x0, y0 = train[0]
    per_epoch = len(x0) // args.epochs
    if mode != "frozen":
        torch.manual_seed(args.seed)
        trainer.train_learner(EpochLoader([batches(x0[e * per_epoch:(e + 1) * per_epoch],
                                                   y0[e * per_epoch:(e + 1) * per_epoch], args.batch_size)
                                           for e in range(args.epochs)]))
    else:  # no first-session training: the given body, FiLM at identity
        trainer.film_params = trainer.feature_adaptation_network(None) if mode == "film" else None
    if mode == "full":
        trainer.film_params = None  # the official test_acc reads it; only its FiLM path sets it
    trainer.feature_extractor.eval()
    logits, own = [], []
    for t in range(len(sessions)):
        xs = torch.cat([train[s][0][:len(train[s][0]) // args.epochs] for s in range(t + 1)])
        ys = torch.cat([train[s][1][:len(train[s][1]) // args.epochs] for s in range(t + 1)])
        assert len(torch.unique(ys)) == sum(len(s) for s in sessions[:t + 1])
        trainer.criterion.logits = []
        try:
            _, acc = trainer.test_cl(batches(xs, ys, 128), batches(test[t][0], test[t][1], 128))
        except torch.linalg.LinAlgError as e:  # its float32 covariance + I, Cholesky
            print(f"reference, session {t}: compute_lda_head failed: {str(e).splitlines()[0]}")
            return None, None, torch.tensor(order)
        logits.append(torch.cat(trainer.criterion.logits))
        own.append(100 * acc)
    return logits, own, torch.tensor(order)


def feature_check(args, weights) -> float:
    """max |ours - reference| of the pooled features on 64 random images (plain and FiLM-at-identity nets)."""
    from cnn.efficientnet import EfficientNet, FilmEfficientNet
    from cnn.features import create_film_adapter

    ours = make_ours(args, weights).eval()
    timm_state = torch.load(weights)
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.no_grad():
        f = ours.forward_features(x)
        for cls in (EfficientNet, FilmEfficientNet):
            net = cls.from_name("efficientnet-b0", num_classes=0)
            net.load_state_dict(map_state(timm_state, net), strict=False)
            net.eval()
            film = create_film_adapter(net)(None) if cls is FilmEfficientNet else None
            r = net(ours.normalize(x), film)
            worst = max(worst, float((f - r).abs().max()))
        print(f"features: {tuple(f.shape)}, mean |f| {float(f.abs().mean()):.3f}, max |ours - reference| {worst:.1e}")
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="the reference's src/ folder")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="the stream's (and so the reference's) batch size")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--drop-connect", type=float, default=0.0,
                    help="stochastic depth in the first session (official B0: 0.2; timm drop_path_rate on ours)")
    ap.add_argument("--bn-momentum", type=float, default=0.01, help="PyTorch convention (official B0: 1 - 0.99)")
    ap.add_argument("--calib-per-class", type=int, default=200, help="upstream images per class (outside the stream)")
    ap.add_argument("--pretrain-steps", type=int, default=0, help="AdamW steps (batch 64) on them before BN calibration")
    ap.add_argument("--modes", default="frozen,film,full")
    ap.add_argument("--ref-lda-float64", action="store_true",
                    help="run the reference's compute_lda_head in float64 (its float32 Cholesky fails on large features)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/tmp/fsa_ref_work")
    ap.add_argument("--weights-out", default="/tmp/fsa_ref_work/tf_efficientnet_b0_shared.pt")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    import ctta

    install_reference(args.reference)
    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed,
                                 train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                                 epochs=args.epochs, batch_size=args.batch_size)
    weights = shared_weights(args, stream)
    feature_check(args, weights)
    for mode in args.modes.split(","):
        t0 = time.time()
        train, test, ours, head0 = run_ours(args, stream, make_ours(args, weights), mode)
        t1 = time.time()
        ref, own, order = run_reference(args, stream, weights, mode, train, test, head0)
        t2 = time.time()
        if ref is None:
            acc = [100 * float((o.argmax(1) == y).float().mean()) for (_, y), o in zip(test, ours)]
            print(f"mode {mode}: ours {' '.join(f'{a:.2f}' for a in acc)}; average incremental / last "
                  f"{sum(acc) / len(acc):.2f} / {acc[-1]:.2f}; the reference stopped (above)")
            continue
        print(f"\nmode {mode}: cifar10_ci, class order {order.tolist()}, {len(train[0][0])} first-session steps' "
              f"images, seed {args.seed}, drop connect {args.drop_connect}, BN momentum {args.bn_momentum}; "
              f"ours {t1 - t0:.0f} s, reference {t2 - t1:.0f} s")
        print("| after session | test images | ours acc % | reference acc % (per image / its batch mean) | "
              "identical argmax % | max abs(logit difference), seen classes | reference argmax on an unseen class |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        acc_o, acc_r = [], []
        for t, ((x, y), o, r) in enumerate(zip(test, ours, ref)):
            seen = order[:sum(len(s) for s in stream.spec["sessions"][:t + 1])]
            a_ours, a_ref = o.argmax(1), order[r.argmax(1)]
            acc_o.append(100 * float((a_ours == y).float().mean()))
            acc_r.append(100 * float((a_ref == y).float().mean()))
            unseen = int((~torch.isin(a_ref, seen)).sum())
            print(f"| {t} | {len(y)} | {acc_o[-1]:.2f} | {acc_r[-1]:.2f} / {own[t]:.2f} | "
                  f"{100 * float((a_ours == a_ref).float().mean()):.2f} | "
                  f"{float((o[:, seen] - r[:, :len(seen)]).abs().max()):.1e} | {unseen} |")
        print(f"| average incremental / last | | {sum(acc_o) / len(acc_o):.2f} / {acc_o[-1]:.2f} | "
              f"{sum(acc_r) / len(acc_r):.2f} / {acc_r[-1]:.2f} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
