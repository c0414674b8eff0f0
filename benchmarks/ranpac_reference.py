"""Agreement of our ``ranpac`` strategy with LAMDA-PILOT's RanPAC (sun-hailong/LAMDA-PILOT ``models/ranpac.py``):
the same frozen backbone, training and test images, class order, sessions and random projection.

The reference is not part of this repository: give a folder holding its ``models/``, ``utils/`` and ``backbone/`` with
``--reference`` (``git archive`` of the mirror); this script contains none of its code. It imports the reference's
``Learner`` and runs its ``incremental_train`` (``update_fc``: a ``CosineLinear`` head grown by each session's
classes; ``_train``: ``setup_RP`` in the first session, then ``replace_fc``: ``G += H^T H``, ``Q += H^T Y``,
``optimise_ridge_parameter``, ``torch.linalg.solve``) and evaluates its network on the test images, replacing only
what ties it to its data and hardware:

- ``utils.inc_net.get_backbone``: our small pretrained ViT up to its pooled features (frozen, eval mode;
  ``out_dim`` = its width) instead of a ViT-B/16; device CPU;
- ``_init_train``: skipped (``--first-session none``: a frozen backbone, as the official code's ``ncm`` rows with
  ``use_RP``; PILOT's own ``tuned_epoch`` 0 would fail on an undefined ``info`` after its empty epoch loop);
- ``setup_RP``: the global torch generator is seeded with our projection's seed just before it, so its
  ``torch.randn(D, M)`` is our ``W_rand``;
- timm 1.0's moved ``timm.models.layers.weight_init`` (imported by its ``backbone/linears.py``): an alias;
- its loaders: ``num_workers`` 0 and no shuffling (its prototype loader shuffles; the order matters only for the
  80 / 20 split of the ridge selection, so both sides use our stream's order, itself a seeded shuffle);
- the data manager: a stand-in whose ``get_dataset`` gives our stream's images (session ``t``'s training images;
  the test images of our eval segment after session ``t``), labels as positions in our class order.

Ours runs through ``ctta.strategies.create("ranpac", model, first_session="none", M=...)`` on the ``cifar10_ci``
stream (5 sessions of 2 classes), driven segment by segment as the engine does.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/ranpac_reference.py --reference /tmp/ref_ranpac \\
        --vit /tmp/vit_cifar_small.pt --data-root ../shared/data/cifar10 --train-per-class 1000 \\
        --test-per-class 500 --seed 1 --M 2000

Prints per session both accuracies on the seen classes, the lambdas chosen, identical argmaxes, the largest
|logit difference| and |head difference|, then average incremental and last accuracy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

VIT = dict(img_size=32, patch_size=8, depth=4, embed_dim=128, num_heads=4)


class Feats(nn.Module):
    """The reference's ``backbone``: images -> our ViT's pooled features (``out_dim`` wide)."""

    def __init__(self, clf):
        super().__init__()
        self.clf = clf.eval().requires_grad_(False)
        self.out_dim = clf.feature_dim

    def forward(self, x):
        return self.clf.forward_features(x)


class Images(Dataset):
    """(index, image, label) items, as the reference's datasets give them; ``labels`` as a NumPy array."""

    def __init__(self, x, y):
        self.x, self.labels = x, np.asarray(y)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return i, self.x[i], int(self.labels[i])


class DataManager:
    """The reference's data manager interface over our stream's sessions (labels as class-order positions)."""

    def __init__(self, sessions, train, test, position):
        self.sessions, self.train, self.test, self.position = sessions, train, test, position

    def get_task_size(self, task):
        return len(self.sessions[task])

    def get_dataset(self, indices, source, mode, appendent=None, ret_data=False):
        sizes = [int(v) for v in np.cumsum([len(s) for s in self.sessions])]
        t = sizes.index(int(max(indices)) + 1)
        x, y = (self.train if source == "train" else self.test)[t]
        return Images(x, self.position[y].numpy())


def run_ours(stream, make_model, M, head):
    import ctta

    ours = ctta.strategies.create("ranpac", make_model(), seed=0, M=M, head=head, first_session="none")
    train, test, out, heads = [], [], [], []
    for seg in stream.segments:
        ours.segment_start(seg)
        x, y, _ = seg.materialise(torch.device("cpu"))
        if seg.kind == "train":
            train.append((x, y))
            for i in range(0, len(x), seg.batch_size):
                ours.learn(x[i:i + seg.batch_size], y[i:i + seg.batch_size])
        else:
            test.append((x, y))
            out.append(torch.cat([ours.predict(x[i:i + seg.batch_size]) for i in range(0, len(x), seg.batch_size)]))
            heads.append(ours.weight.clone())
        ours.segment_end(seg)
    return ours, train, test, out, heads


def run_reference(args, stream, make_model, train, test, seed):
    sys.path.insert(0, os.path.abspath(args.reference))
    import timm.layers.weight_init

    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)  # moved in timm 1.0
    import utils.inc_net as inc  # noqa: E402  (the reference's)

    inc.get_backbone = lambda a, pretrained=False: Feats(make_model())
    import models.ranpac as ranpac  # noqa: E402

    ranpac.num_workers = 0
    ranpac.DataLoader = lambda ds, batch_size, shuffle, num_workers: DataLoader(ds, batch_size=batch_size)
    ranpac.Learner._init_train = lambda self, *a, **k: None
    setup = ranpac.Learner.setup_RP

    def seeded_setup(self):
        torch.manual_seed(seed)
        setup(self)

    ranpac.Learner.setup_RP = seeded_setup
    chosen = []
    opt = ranpac.Learner.optimise_ridge_parameter

    def recorded(self, f, y):
        chosen.append(float(opt(self, f, y)))
        return chosen[-1]

    ranpac.Learner.optimise_ridge_parameter = recorded
    order = list(stream.spec["class_order"])
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    sessions = stream.spec["sessions"]
    dm = DataManager(sessions, train, test, position)
    learner = ranpac.Learner({"memory_size": 0, "device": [torch.device("cpu")], "backbone_type": "ours_vit",
                              "batch_size": 48, "init_lr": 0.01, "weight_decay": 0.0005, "min_lr": 0.0,
                              "optimizer": "sgd", "tuned_epoch": 0, "use_RP": True, "M": args.M,
                              "nb_classes": len(order)})
    logits, heads = [], []
    for t in range(len(sessions)):
        learner.incremental_train(dm)
        net = learner._network.eval()
        with torch.no_grad():
            logits.append(torch.cat([net(x)["logits"] for _, x, _ in learner.test_loader]))
        heads.append(net.fc.weight.detach().clone())
        learner.after_task()
    return logits, heads, chosen, torch.tensor(order)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="folder with the reference's models/, utils/, backbone/")
    ap.add_argument("--vit", required=True, help="the small pretrained ViT (benchmarks/pretrain_vit.py)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=500)
    ap.add_argument("--M", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta
    from ctta.strategies.ranpac import projection_seed

    def make_model():
        return ctta.backbones.create("vit_tiny_patch16_224", num_classes=10, weights=args.vit, **VIT).eval()

    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed,
                                 train_per_class=args.train_per_class, test_per_class=args.test_per_class or None)
    t0 = time.time()
    ours, train, test, out, our_heads = run_ours(stream, make_model, args.M, "cosine")
    t1 = time.time()
    ref, ref_heads, chosen, order = run_reference(args, stream, make_model, train, test, projection_seed(0))
    t2 = time.time()
    print(f"cifar10_ci, class order {order.tolist()}, {sum(len(x) for x, _ in train)} training images, seed "
          f"{args.seed}, M {args.M}; ours {t1 - t0:.0f} s, reference {t2 - t1:.0f} s")
    print("| after session | test images | lambda ours / ref | ours acc % | reference acc % | identical argmax % | "
          "max abs(logit diff) | max abs(head diff) / max abs(head) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    acc_o, acc_r = [], []
    for t, ((x, y), o, r, ho, hr) in enumerate(zip(test, out, ref, our_heads, ref_heads)):
        seen = order[:r.shape[1]]
        a_ours, a_ref = o.argmax(1), seen[r.argmax(1)]
        acc_o.append(100 * float((a_ours == y).float().mean()))
        acc_r.append(100 * float((a_ref == y).float().mean()))
        dh = float((ho[seen] - hr).abs().max() / hr.abs().max())
        print(f"| {t} | {len(y)} | {ours.chosen[t]:g} / {chosen[t]:g} | {acc_o[-1]:.2f} | {acc_r[-1]:.2f} | "
              f"{100 * float((a_ours == a_ref).float().mean()):.2f} | {float((o[:, seen] - r).abs().max()):.1e} | "
              f"{dh:.1e} |")
    print(f"average incremental accuracy: ours {np.mean(acc_o):.2f}, reference {np.mean(acc_r):.2f}; "
          f"last: ours {acc_o[-1]:.2f}, reference {acc_r[-1]:.2f}")
    print(f"G is M x M = {args.M}^2 entries: {4 * args.M ** 2 / 2 ** 20:.0f} MiB in float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
