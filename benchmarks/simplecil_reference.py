"""Agreement of our ``simplecil`` strategy with the official SimpleCIL (zhoudw-zdw/RevisitingCIL
``models/simplecil.py``): the same frozen backbone, training and test images, class order and sessions.

The reference is not part of this repository: give a folder holding its ``models/``, ``utils/`` and ``convs/`` with
``--reference``; this script contains none of its code. It imports the reference's ``Learner`` and runs its
``incremental_train`` (``update_fc`` -> a ``CosineLinear`` head grown by each session's classes, ``replace_fc``:
each new class's weight row = the mean of its training embeddings) and its ``_eval_cnn`` (argmax of the cosine
logits over all classes seen), replacing only what ties it to its data and hardware:

- ``utils.inc_net.get_convnet``: the shared ResNet-20 up to its pooled 64-d features (frozen, eval mode) instead of
  a timm ViT (``out_dim`` = 64); ``Tensor.cuda`` / ``Module.cuda`` are the identity (CPU);
- the data manager: a stand-in whose ``get_dataset`` gives our stream's images (session ``t``'s training images;
  the test images of our eval segment after session ``t``), labels as positions in our class order (the
  reference's data manager also relabels by class order); ``num_workers`` 0.

Ours runs through ``ctta.strategies.create("simplecil", model)`` on the ``cifar10_ci`` stream (5 sessions of 2
classes, seeded class order), driven segment by segment as the engine does (``learn`` / ``predict``).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/simplecil_reference.py --reference /tmp/ref_simplecil \\
        --weights ../shared/models/resnet20-12fca82f.th --data-root ../shared/data/cifar10 --train-per-class 1000

Prints per session our error and the reference's on the seen classes, the share of identical argmaxes and the
largest |logit difference| (cosines over the seen classes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


class Feats(nn.Module):
    """The reference's ``convnet``: images -> our backbone's pooled features (``out_dim`` wide)."""

    def __init__(self, clf):
        super().__init__()
        self.clf = clf.eval()
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
        # train: indices = arange(known, total), the classes of the session ending at total; test: arange(0, total)
        sizes = [int(v) for v in np.cumsum([len(s) for s in self.sessions])]
        t = sizes.index(int(max(indices)) + 1)
        x, y = (self.train if source == "train" else self.test)[t]
        return Images(x, self.position[y].numpy())


def run_ours(stream, make_model):
    import ctta

    ours = ctta.strategies.create("simplecil", make_model(), seed=0)
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
            out.append(torch.cat([ours.predict(x[i:i + seg.batch_size]) for i in range(0, len(x), seg.batch_size)]))
        ours.segment_end(seg)
    return train, test, out


def run_reference(args, stream, make_model, train, test):
    sys.path.insert(0, os.path.abspath(args.reference))
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    import utils.inc_net as inc  # noqa: E402  (the reference's)

    inc.get_convnet = lambda a, pretrained=False: Feats(make_model())
    import models.simplecil as simplecil  # noqa: E402

    simplecil.num_workers = 0
    order = list(stream.spec["class_order"])
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    sessions = stream.spec["sessions"]
    dm = DataManager(sessions, train, test, position)
    torch.manual_seed(args.seed)  # its prototype loader shuffles (the mean does not depend on the order but rounding)
    learner = simplecil.Learner({"memory_size": 0, "device": [torch.device("cpu")], "convnet_type": "ours"})
    learner.topk = 1
    logits = []
    for t in range(len(sessions)):
        learner.incremental_train(dm)
        net = learner._network.eval()
        with torch.no_grad():
            logits.append(torch.cat([net(x)["logits"] for _, x, _ in learner.test_loader]))
        y_pred, _ = learner._eval_cnn(learner.test_loader)
        assert torch.equal(torch.from_numpy(y_pred[:, 0]), logits[-1].argmax(1))
        learner.after_task()
    return logits, torch.tensor(order)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="folder with the reference's models/, utils/, convs/")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--backbone", default="resnet20_cifar")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=0, help="0: the whole test split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta

    def make_model():
        m = ctta.backbones.create(args.backbone, weights=args.weights).eval()
        return m.requires_grad_(False)

    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed,
                                 train_per_class=args.train_per_class, test_per_class=args.test_per_class or None)
    t0 = time.time()
    train, test, ours = run_ours(stream, make_model)
    t1 = time.time()
    ref, order = run_reference(args, stream, make_model, train, test)
    t2 = time.time()
    print(f"cifar10_ci, class order {order.tolist()}, {sum(len(x) for x, _ in train)} training images, seed "
          f"{args.seed}; ours {t1 - t0:.0f} s, reference {t2 - t1:.0f} s")
    print("| after session | test images | ours error % | reference error % | identical argmax % | "
          "max abs(logit difference) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for t, ((x, y), o, r) in enumerate(zip(test, ours, ref)):
        seen = order[:r.shape[1]]
        o_seen = o[:, seen]  # ours: logits over all classes, unseen at -inf; the reference's are over seen ones
        a_ours, a_ref = o.argmax(1), seen[r.argmax(1)]
        eo, er = 100 * float((a_ours != y).float().mean()), 100 * float((a_ref != y).float().mean())
        print(f"| {t} | {len(y)} | {eo:.2f} | {er:.2f} | {100 * float((a_ours == a_ref).float().mean()):.2f} | "
              f"{float((o_seen - r).abs().max()):.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
