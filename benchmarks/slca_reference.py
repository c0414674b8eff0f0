"""Agreement of our ``slca`` strategy with LAMDA-PILOT's SLCA (sun-hailong/LAMDA-PILOT@2647455 ``models/slca.py``):
the same pretrained ViT, initial heads, training batches, class order, epochs, test images and alignment draws.

The reference is not part of this repository: give a folder holding its ``models/``, ``utils/`` and ``backbone/`` with
``--reference`` (``git archive`` of the mirror); this script contains none of its code. It imports the reference's
``Learner`` and runs its ``incremental_train`` (``update_fc``: a new ``SimpleContinualLinear`` head per session;
``_stage1_training`` / ``_run``: SGD with the backbone at lr x ``bcb_lrscale`` and the head at lr, MultiStepLR,
cross-entropy on ``logits[:, known:]``; ``fc.backup``; ``_compute_class_mean``: mean and ``torch.cov`` + 1e-4 I of
each new class's features; ``_stage2_compact_classifier``: the alignment on ``MultivariateNormal`` samples with logit
normalisation), then evaluates its network on the test images and calls its ``after_task`` (``fc.recall``),
replacing only what ties it to its data, hardware and downloads:

- ``utils.inc_net.get_backbone``: timm's ``vit_tiny_patch16_224`` built at our small ViT's shape with
  ``num_classes`` 0 (as PILOT builds its ``vit_base_patch16_224``), loaded with our checkpoint's weights, behind our
  input normalisation (``out_dim`` its width); device CPU;
- each new per-session head starts from our head's initial rows of the session's classes (one start for both);
- ``torch.manual_seed(alignment_seed(0, t))`` just before its ``_stage2_compact_classifier`` of session ``t``: its
  ``MultivariateNormal.sample`` and ``randperm`` draw from the global generator the numbers our alignment draws from
  its own generator with that seed;
- the data manager and loaders: its training loader yields our train segment's batches, epoch by epoch (its
  train-accuracy pass in eval mode re-reads the epoch just trained); the per-class loaders of
  ``_compute_class_mean`` give the class's training images once, in our order; the test images are our eval
  segment's; labels as positions in our class order (as its data manager relabels); plain in-order batch
  iterators instead of torch DataLoaders (whose iterators draw a seed from the global generator: its test-accuracy
  pass between alignment epochs would shift the later epochs' draws);
- timm 1.0's moved ``timm.models.layers.weight_init`` (imported by its ``backbone/linears.py``): an alias.

``--official`` with ``--reference`` a ``git archive`` of GengDavid/SLCA@169d4e6 (the code of the paper's numbers): its
``models/slca.py`` ``SLCA`` learner with ``exps/slca/slca_cifar.json``'s values (lr 0.01, weight decay 5e-4 and
``bcb_lrscale`` 1/100 its module constants / defaults), driven the same way; stand-ins for its ``utils.inc_net.
get_convnet`` (the same backbone, output ``{"features": ...}``) and its ``save_checkpoint`` (writes ``logs/``),
``memory_per_class`` / ``fixed_memory`` given (its base learner reads them); its loaders' batch size is ours.

Ours runs through ``ctta.strategies.create("slca", model, ca_epochs=...)`` on the ``cifar10_ci`` stream, driven
segment by segment as the engine does. Epoch boundaries must fall on batch boundaries (2 x train_per_class divisible
by the batch size), as the reference's per-epoch loader has them.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/slca_reference.py --reference /tmp/slca_ref \\
        --vit /tmp/vit_cifar_small.pt --data-root ../shared/data/cifar10 --train-per-class 256 \\
        --test-per-class 100 --epochs 2 --batch-size 64 --ca-epochs 5 --seed 1      # + --official, /tmp/slca_off

Prints per session both accuracies on the seen classes, identical argmaxes, the largest |logit difference|, the
largest |difference| of the backbone's weights, and of the trained head, the class statistics and the aligned head
relative to the reference's largest |entry|, then average incremental and last accuracy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ranpac_reference  # noqa: E402  (its DataManager, EpochImages, EpochLoader)
from ranpac_reference import VIT, EpochImages  # noqa: E402
from simplecil_reference import Images  # noqa: E402


class Backbone(nn.Module):
    """The reference's backbone: timm's ViT at our shape (``num_classes`` 0) with our weights, after our input
    normalisation; images -> pooled features (``out_dim`` wide)."""

    def __init__(self, clf: nn.Module) -> None:
        super().__init__()
        import timm

        self.normalize = clf.normalize
        self.net = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT)
        state = {k: v for k, v in clf.net.state_dict().items() if not k.startswith("head.")}
        self.net.load_state_dict(state)
        self.out_dim = VIT["embed_dim"]

    def forward(self, x):
        return self.net(self.normalize(x))


class DictBackbone(Backbone):
    """The official code's ``convnet``: the same backbone, its output as ``{"features": ...}``."""

    def forward(self, x):
        return {"features": super().forward(x)}


class TrainLoader(ranpac_reference.EpochLoader):
    """The training loader: each iteration while the network trains yields the next epoch's batches; an iteration
    in eval mode (its train-accuracy pass after an epoch) yields the last trained epoch's again."""

    def __init__(self, ds, batch_size, training):
        super().__init__(ds, batch_size)
        self.training = training

    def __iter__(self):
        if self.training() or self.epoch == 0:
            self.epoch += 1
        start = (self.epoch - 1) * self.n
        for i in range(start, start + self.n, self.batch_size):
            j = min(i + self.batch_size, start + self.n)
            yield torch.arange(i, j), self.ds.x[i:j], torch.as_tensor(self.ds.labels[i:j])


class Batches:
    """A plain in-order batch iterator for its other loaders (test, per-class): a torch DataLoader's iterator draws
    a seed from the global generator each time, which would shift its alignment draws after the first epoch (it
    evaluates the test loader between alignment epochs)."""

    def __init__(self, ds, batch_size):
        self.ds, self.batch_size = ds, batch_size

    def __len__(self):
        return -(-len(self.ds) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.ds), self.batch_size):
            j = min(i + self.batch_size, len(self.ds))
            yield torch.arange(i, j), self.ds.x[i:j], torch.as_tensor(self.ds.labels[i:j])


class DataManager(ranpac_reference.DataManager):
    """RanPAC's data manager plus the per-class sets of ``_compute_class_mean`` (``source`` train, ``mode`` test, one
    class position: that class's training images once, in our order, with ``ret_data``)."""

    dataset_name = "cifar10_ci"

    def get_dataset(self, indices, source, mode, appendent=None, ret_data=False, with_raw=False):
        if source == "train" and mode == "test" and len(indices) == 1:
            c = int(indices[0])
            sizes = [int(v) for v in np.cumsum([len(s) for s in self.sessions])]
            t = next(k for k, s in enumerate(sizes) if c < s)
            x, y, epochs = self.train[t]
            n = len(y) // epochs
            pos = self.position[y[:n]]
            keep = pos == c
            ds = Images(x[:n][keep], pos[keep].numpy())
            return ds.x, ds.labels, ds
        return super().get_dataset(indices, source, mode, appendent, ret_data)


def make_model(vit: str) -> nn.Module:
    import ctta

    return ctta.backbones.create("vit_tiny_patch16_224", num_classes=10, weights=vit, **VIT).eval()


def run_ours(stream, model, **hp):
    import ctta

    ours = ctta.strategies.create("slca", model, seed=0, **hp)
    head0 = (ours.head_weight.detach().clone(), ours.head_bias.detach().clone())
    train, test, out, snaps = [], [], [], []
    for seg in stream.segments:
        ours.segment_start(seg)
        x, y, _ = seg.materialise(torch.device("cpu"))
        if seg.kind == "train":
            train.append((x, y, int(seg.meta.get("epochs", 1))))
            for i in range(0, len(x), seg.batch_size):
                ours.learn(x[i:i + seg.batch_size], y[i:i + seg.batch_size])
        else:
            test.append((x, y))
            out.append(torch.cat([ours.predict(x[i:i + seg.batch_size]) for i in range(0, len(x), seg.batch_size)]))
            aligned = ours.aligned_weight.clone() if ours.aligned_weight.numel() else ours.head_weight.detach().clone()
            snaps.append({"backbone": {n: p.detach().clone() for n, p in ours.model.net.named_parameters()
                                       if not n.startswith("head.")},
                          "head": ours.head_weight.detach().clone(), "aligned": aligned,
                          "means": ours.stats.means.clone(), "covs": ours.stats.covs.clone()})
        ours.segment_end(seg)
    return ours, head0, train, test, out, snaps


def run_reference(args, stream, head0, train, test):
    """PILOT's ``models/slca.py`` ``Learner`` or (``--official``) GengDavid/SLCA's ``models/slca.py`` ``SLCA``."""
    sys.path.insert(0, os.path.abspath(args.reference))
    import timm.layers.weight_init

    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)  # moved in timm 1.0
    import utils.inc_net as inc  # noqa: E402  (the reference's)

    if args.official:
        inc.get_convnet = lambda cfg, pretrained=False: DictBackbone(make_model(args.vit))
    else:
        inc.get_backbone = lambda a, pretrained=False: Backbone(make_model(args.vit))
    import models.base as base  # noqa: E402
    import models.slca as slca  # noqa: E402
    from ctta.strategies.slca import alignment_seed

    Learner = slca.SLCA if args.official else slca.Learner
    slca.num_workers = 0
    batch = stream.segments[0].batch_size
    learner = None
    base.DataLoader = slca.DataLoader = lambda ds, batch_size, shuffle, num_workers: (
        TrainLoader(ds, batch, lambda: learner._network.training) if isinstance(ds, EpochImages)
        else Batches(ds, batch_size))
    order = list(stream.spec["class_order"])
    stage1 = Learner._stage1_training

    def started_alike(self, train_loader, test_loader):  # the new head's rows = our initial rows of its classes
        rows = torch.tensor(order[self._known_classes:self._total_classes])
        with torch.no_grad():
            lin = self._network.fc.heads[-1][-1]
            lin.weight.copy_(head0[0][rows])
            lin.bias.copy_(head0[1][rows])
        stage1(self, train_loader, test_loader)

    Learner._stage1_training = started_alike
    stage2 = Learner._stage2_compact_classifier

    def seeded(self, task_size):
        torch.manual_seed(alignment_seed(0, self._cur_task))
        stage2(self, task_size)

    Learner._stage2_compact_classifier = seeded
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    sessions = stream.spec["sessions"]
    dm = DataManager(sessions, train, test, position)
    if args.official:  # its exps/slca/slca_cifar.json (epochs ours); lr 0.01 and weight decay 5e-4 are its constants
        Learner.save_checkpoint = lambda self, *a, **k: None  # writes logs/ (no effect on the run)
        learner = Learner({"memory_size": 0, "memory_per_class": 0, "fixed_memory": False,
                           "device": [torch.device("cpu")], "convnet_type": "ours_vit",
                           "model_name": "slca_cifar", "model_postfix": "side_by_side", "prefix": "reproduce",
                           "epochs": train[0][2], "milestones": [18], "ca_epochs": args.ca_epochs,
                           "ca_with_logit_norm": 0.1, "run_id": 0, "seed": args.seed})
    else:  # its exps/slca.json (epochs, batch and ca_epochs ours)
        learner = Learner({"memory_size": 0, "device": [torch.device("cpu")], "backbone_type": "ours_vit",
                           "batch_size": batch, "epochs": train[0][2], "lrate": 0.01, "lrate_decay": 0.1,
                           "weight_decay": 5e-4, "milestones": [18], "ca_epochs": args.ca_epochs,
                           "ca_with_logit_norm": 0.1, "seed": args.seed})
    logits, snaps = [], []
    for t in range(len(sessions)):
        learner.incremental_train(dm)
        net = learner._network.eval()
        with torch.no_grad():
            logits.append(torch.cat([net(x)["logits"] for _, x, _ in learner.test_loader]))
        heads = net.fc.heads
        raw = net.fc.old_state_dict
        means, covs = ((learner._class_means, learner._class_covs) if args.official
                       else (learner._class_means_slca, learner._class_covs_slca))
        backbone = net.convnet if args.official else net.backbone
        snaps.append({"backbone": {n: p.detach().clone() for n, p in backbone.net.named_parameters()},
                      "head": torch.cat([raw[f"heads.{k}.0.weight"] for k in range(len(heads))]),
                      "aligned": torch.cat([h[-1].weight.detach() for h in heads]),
                      "means": torch.from_numpy(means).clone(), "covs": covs.clone()})
        learner.after_task()
    return logits, snaps, torch.tensor(order)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="folder with PILOT's models/, utils/, backbone/ (or, with "
                    "--official, GengDavid/SLCA's models/, utils/, convs/)")
    ap.add_argument("--official", action="store_true", help="--reference is GengDavid/SLCA (its SLCA learner)")
    ap.add_argument("--vit", required=True, help="the small pretrained ViT (benchmarks/pretrain_vit.py)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train-per-class", type=int, default=320)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ca-epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1, help="the stream's seed (class order, subsets, batches)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta

    if (2 * args.train_per_class) % args.batch_size:
        ap.error("epoch boundaries must fall on batch boundaries (2 x train_per_class divisible by the batch size)")
    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed,
                                 train_per_class=args.train_per_class, test_per_class=args.test_per_class or None,
                                 epochs=args.epochs, batch_size=args.batch_size)
    t0 = time.time()
    ours, head0, train, test, out, our_snaps = run_ours(stream, make_model(args.vit), ca_epochs=args.ca_epochs)
    t1 = time.time()
    ref, ref_snaps, order = run_reference(args, stream, head0, train, test)
    t2 = time.time()
    print(f"cifar10_ci, class order {order.tolist()}, {sum(len(y) // e for _, y, e in train)} training images, "
          f"{args.epochs} epochs, batch {args.batch_size}, {args.ca_epochs} alignment epochs, seed {args.seed}; "
          f"ours {t1 - t0:.0f} s, reference {t2 - t1:.0f} s")
    print("| after session | test images | ours acc % | reference acc % | identical argmax % | max abs(logit diff) | "
          "max abs(backbone diff) | trained head | class means | class covariances | aligned head |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    acc_o, acc_r = [], []
    for t, ((_, y), o, r, so, sr) in enumerate(zip(test, out, ref, our_snaps, ref_snaps)):
        seen = order[:r.shape[1]]
        a_ours, a_ref = o.argmax(1), seen[r.argmax(1)]
        acc_o.append(100 * float((a_ours == y).float().mean()))
        acc_r.append(100 * float((a_ref == y).float().mean()))
        bb = max(float((so["backbone"][n] - p).abs().max()) for n, p in sr["backbone"].items())
        diff = {k: float((so[k][seen] - sr[k]).abs().max() / sr[k].abs().max().clamp_min(1e-30))
                for k in ("head", "aligned", "means", "covs")}
        print(f"| {t} | {len(y)} | {acc_o[-1]:.2f} | {acc_r[-1]:.2f} | "
              f"{100 * float((a_ours == a_ref).float().mean()):.2f} | {float((o[:, seen] - r).abs().max()):.1e} | "
              f"{bb:.1e} | {diff['head']:.1e} | {diff['means']:.1e} | {diff['covs']:.1e} | {diff['aligned']:.1e} |")
    print(f"average incremental accuracy: ours {np.mean(acc_o):.2f}, reference {np.mean(acc_r):.2f}; "
          f"last: ours {acc_o[-1]:.2f}, reference {acc_r[-1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
