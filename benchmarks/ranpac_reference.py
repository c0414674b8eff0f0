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
- its loaders: our train batch size (its 48 otherwise), ``num_workers`` 0 and no shuffling (its prototype loader
  shuffles; the order matters only for the 80 / 20 split of the ridge selection, so both sides use our stream's
  order, itself a seeded shuffle); its training loader (``--first-session adapter``) yields our train segment's
  batches, epoch by epoch;
- the data manager: a stand-in whose ``get_dataset`` gives our stream's images (session ``t``'s training images;
  the test images of our eval segment after session ``t``), labels as positions in our class order.

Ours runs through ``ctta.strategies.create("ranpac", model, first_session="none", M=...)`` on the ``cifar10_ci``
stream (5 sessions of 2 classes), driven segment by segment as the engine does.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/ranpac_reference.py --reference /tmp/ref_ranpac \\
        --vit /tmp/vit_cifar_small.pt --data-root ../shared/data/cifar10 --train-per-class 1000 \\
        --test-per-class 500 --seed 1 --M 2000

``--official`` with ``--reference`` a ``git archive`` of RanPAC/RanPAC: the official ``RanPAC.py`` ``Learner``
(``model_name`` ncm, ``use_RP``: frozen backbone, linear head) against ours with ``head: linear``; its ``.cuda()`` and
``.to(device='cuda')`` are the identity, its ``trainer.py`` flags ``is_dil`` / ``dil_init`` False (CIL), and the
generator is seeded just before its ``W_rand`` draw (its head's ``reset_parameters`` draws first).

Prints per session both accuracies on the seen classes, the lambdas chosen, identical argmaxes, the largest
|logit difference| and |head difference|, then average incremental and last accuracy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import simplecil_reference  # noqa: E402  (its Feats, Images, DataManager)
from simplecil_reference import Images  # noqa: E402

VIT = dict(img_size=32, patch_size=8, depth=4, embed_dim=128, num_heads=4)

TRAIN_SEED = 12345  # the global torch generator before the first-session training (dropout masks), both sides


class Feats(simplecil_reference.Feats):
    """The reference's ``backbone``: images -> our ViT's pooled features (``out_dim`` wide), gradients off."""

    def __init__(self, clf):
        super().__init__(clf)
        self.clf.requires_grad_(False)


class DataManager(simplecil_reference.DataManager):
    """SimpleCIL's data manager, whose training sessions carry their epochs (our batches, epoch by epoch)."""

    def get_dataset(self, indices, source, mode, appendent=None, ret_data=False):
        sizes = [int(v) for v in np.cumsum([len(s) for s in self.sessions])]
        t = sizes.index(int(max(indices)) + 1)
        if source == "test":
            x, y = self.test[t]
            return Images(x, self.position[y].numpy())
        x, y, epochs = self.train[t]
        n = len(y) // epochs
        if mode == "train":  # the training loader: our batches, epoch by epoch
            return EpochImages(x, self.position[y].numpy(), epochs)
        return Images(x[:n], self.position[y[:n]].numpy())  # one pass, in our order


class EpochImages(Images):
    """Every epoch's samples of a session in our order (the training loader's input)."""

    def __init__(self, x, y, epochs):
        super().__init__(x, y)
        self.epochs = epochs


class EpochLoader:
    """The reference's training loader: epoch ``e`` of each iteration yields our ``e``-th pass, in our batches."""

    def __init__(self, ds, batch_size):
        self.ds, self.batch_size, self.epoch = ds, batch_size, 0
        self.n = len(ds) // ds.epochs

    def __len__(self):
        return -(-self.n // self.batch_size)

    def __iter__(self):
        start, self.epoch = self.epoch * self.n, self.epoch + 1
        for i in range(start, start + self.n, self.batch_size):
            j = min(i + self.batch_size, start + self.n)
            yield torch.arange(i, j), self.ds.x[i:j], torch.as_tensor(self.ds.labels[i:j])


class AdapterFeats(nn.Module):
    """The reference's adapter backbone (its own ``vit_adapter.VisionTransformer`` at our ViT's size, our weights):
    images -> ``forward_features(normalize(x))``."""

    def __init__(self, vit_adapter, clf, tuning):
        super().__init__()
        from functools import partial

        self.normalize = clf.normalize
        self.vit = vit_adapter.VisionTransformer(
            img_size=VIT["img_size"], patch_size=VIT["patch_size"], embed_dim=VIT["embed_dim"], depth=VIT["depth"],
            num_heads=VIT["num_heads"], mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_classes=0, global_pool=False, drop_path_rate=0.0, tuning_config=tuning)
        d = VIT["embed_dim"]
        state = {}
        for k, v in clf.net.state_dict().items():  # as its vit_base_patch16_224_adapter converts timm's
            if k.startswith("head."):
                continue
            if "qkv." in k:
                for part, w in zip("qkv", (v[:d], v[d:2 * d], v[2 * d:])):
                    state[k.replace("qkv.", f"{part}_proj.")] = w
            else:
                state[k.replace("mlp.fc", "fc")] = v
        msg = self.vit.load_state_dict(state, strict=False)
        assert not msg.unexpected_keys and all("adaptmlp" in k for k in msg.missing_keys), msg
        for n, p in self.vit.named_parameters():
            p.requires_grad = n in msg.missing_keys  # its rule: only what the checkpoint lacks trains
        self.out_dim = d

    def forward(self, x):
        return self.vit.forward_features(self.normalize(x))


def run_ours(stream, make_model, M, head, first_session, train_seed):
    import ctta

    ours = ctta.strategies.create("ranpac", make_model(), seed=0, M=M, head=head, first_session=first_session)
    init = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    train, test, out, heads, losses = [], [], [], [], []
    for seg in stream.segments:
        ours.segment_start(seg)
        x, y, _ = seg.materialise(torch.device("cpu"))
        if seg.kind == "train":
            epochs = int(seg.meta.get("epochs", 1))
            train.append((x, y, epochs))
            if not losses:
                torch.manual_seed(train_seed)  # the adapters' dropout masks: drawn alike on both sides
            for i in range(0, len(x), seg.batch_size):
                o = ours.learn(x[i:i + seg.batch_size], y[i:i + seg.batch_size])
                if len(train) == 1:
                    losses.append(float(torch.nn.functional.cross_entropy(o, y[i:i + seg.batch_size])))
        else:
            test.append((x, y))
            out.append(torch.cat([ours.predict(x[i:i + seg.batch_size]) for i in range(0, len(x), seg.batch_size)]))
            heads.append(ours.weight.clone())
        ours.segment_end(seg)
    return ours, train, test, out, heads, init, losses


def run_reference(args, stream, make_model, train, test, seed, init, train_seed):
    sys.path.insert(0, os.path.abspath(args.reference))
    import timm.layers.weight_init

    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)  # moved in timm 1.0
    import utils.inc_net as inc  # noqa: E402  (the reference's)

    adapt = args.first_session == "adapter"
    if adapt:
        import backbone.vit_adapter as vit_adapter  # noqa: E402  (the reference's)

        tuning = types.SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                                       ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1", ffn_num=64,
                                       d_model=VIT["embed_dim"], vpt_on=False, vpt_num=0)
        inc.get_backbone = lambda a, pretrained=False: AdapterFeats(vit_adapter, make_model(), tuning).eval()
    else:
        inc.get_backbone = lambda a, pretrained=False: Feats(make_model())
    import models.ranpac as ranpac  # noqa: E402

    ranpac.num_workers = 0
    ranpac.DataLoader = lambda ds, batch_size, shuffle, num_workers: (
        EpochLoader(ds, batch_size) if isinstance(ds, EpochImages) else DataLoader(ds, batch_size=batch_size))
    order = list(stream.spec["class_order"])
    losses = []
    if adapt:
        init_train = ranpac.Learner._init_train

        def started_alike(self, train_loader, test_loader, optimizer, scheduler):
            net = self._network
            with torch.no_grad():  # our initial adapters and training head (rows in class order)
                for n, p in net.backbone.vit.named_parameters():
                    if "adaptmlp" in n:
                        b, rest = n.split(".adaptmlp.")
                        p.copy_(init["model.net." + b + ".mlp." + rest.replace("_proj", "")])
                net.fc.weight.copy_(init["train_weight"][torch.tensor(order[:net.fc.out_features])])
                net.fc.sigma.copy_(init["train_sigma"])
            fwd = net.forward

            def recording(x):
                out = fwd(x)
                if net.training:
                    losses.append(out["logits"].detach())
                return out

            net.forward = recording
            torch.manual_seed(train_seed)
            init_train(self, train_loader, test_loader, optimizer, scheduler)
            net.forward = fwd

        ranpac.Learner._init_train = started_alike
    else:
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
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    sessions = stream.spec["sessions"]
    dm = DataManager(sessions, train, test, position)
    targets = position[train[0][1]]
    learner = ranpac.Learner({"memory_size": 0, "device": [torch.device("cpu")], "backbone_type": "ours_vit",
                              "batch_size": stream.segments[0].batch_size, "init_lr": 0.01, "weight_decay": 0.0005,
                              "min_lr": 0.0,
                              "optimizer": "sgd", "tuned_epoch": train[0][2] if adapt else 0, "use_RP": True,
                              "M": args.M,
                              "nb_classes": len(order)})
    logits, heads = [], []
    for t in range(len(sessions)):
        learner.incremental_train(dm)
        net = learner._network.eval()
        with torch.no_grad():
            logits.append(torch.cat([net(x)["logits"] for _, x, _ in learner.test_loader]))
        heads.append(net.fc.weight.detach().clone())
        learner.after_task()
    b = stream.segments[0].batch_size
    ce = [float(torch.nn.functional.cross_entropy(o, targets[i * b:(i + 1) * b]))
          for i, o in enumerate(losses)]
    return logits, heads, chosen, torch.tensor(order), ce


def run_official(args, stream, make_model, train, test, seed):
    """The official RanPAC (RanPAC/RanPAC ``RanPAC.py``, ``model_name`` ncm with ``use_RP``: frozen backbone, linear
    head) on the same data; its ``.cuda()`` / ``.to(device='cuda')`` are the identity on this CPU."""
    sys.path.insert(0, os.path.abspath(args.reference))
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    to = torch.Tensor.to
    torch.Tensor.to = lambda self, *a, **k: self if k.get("device") == "cuda" else to(self, *a, **k)
    import inc_net  # noqa: E402  (the official code's)

    inc_net.get_convnet = lambda a, pretrained=False: Feats(make_model())
    import RanPAC  # noqa: E402

    RanPAC.num_workers = 0
    RanPAC.DataLoader = lambda ds, batch_size, shuffle, num_workers: DataLoader(ds, batch_size=batch_size)
    setup = RanPAC.Learner.setup_RP

    def seeded_setup(self):  # seed just before its W_rand draw (its head's reset_parameters draws first)
        randn = torch.randn
        torch.randn = lambda *a, **k: (torch.manual_seed(seed), randn(*a, **k))[1]
        try:
            setup(self)
        finally:
            torch.randn = randn

    RanPAC.Learner.setup_RP = seeded_setup
    chosen = []
    opt = RanPAC.Learner.optimise_ridge_parameter
    RanPAC.Learner.optimise_ridge_parameter = lambda self, f, y: chosen.append(float(opt(self, f, y))) or chosen[-1]
    order = list(stream.spec["class_order"])
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    sessions = stream.spec["sessions"]
    dm = DataManager(sessions, train, test, position)
    dm.get_total_classnum = lambda: len(order)
    learner = RanPAC.Learner({"model_name": "ncm", "convnet_type": "ours_vit", "device": [torch.device("cpu")],
                              "batch_size": stream.segments[0].batch_size, "weight_decay": 0.0005, "min_lr": 0.0,
                              "use_RP": True, "M": args.M, "tuned_epoch": 0, "body_lr": 0.0, "head_lr": 0.0})
    learner.is_dil, learner.dil_init = False, False  # as its trainer.py sets them for a CIL dataset
    logits, heads = [], []
    for t in range(len(sessions)):
        learner.incremental_train(dm)
        net = learner._network.eval()
        with torch.no_grad():
            logits.append(torch.cat([net(x)["logits"] for _, x, _ in learner.test_loader]))
        heads.append(net.fc.weight.detach().clone())
        learner.after_task()
    torch.Tensor.to = to
    return logits, heads, chosen, torch.tensor(order), []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="folder with the reference's models/, utils/, backbone/")
    ap.add_argument("--vit", required=True, help="the small pretrained ViT (benchmarks/pretrain_vit.py)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=500)
    ap.add_argument("--M", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--first-session", choices=["none", "adapter"], default="none")
    ap.add_argument("--official", action="store_true", help="--reference is RanPAC/RanPAC (linear head, frozen)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta
    from ctta.strategies.ranpac import projection_seed

    def make_model():
        return ctta.backbones.create("vit_tiny_patch16_224", num_classes=10, weights=args.vit, **VIT).eval()

    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed,
                                 train_per_class=args.train_per_class, test_per_class=args.test_per_class or None,
                                 epochs=args.epochs, batch_size=args.batch_size)
    t0 = time.time()
    head = "linear" if args.official else "cosine"
    ours, train, test, out, our_heads, init, our_ce = run_ours(stream, make_model, args.M, head,
                                                               args.first_session, TRAIN_SEED)
    t1 = time.time()
    if args.official:
        ref, ref_heads, chosen, order, ref_ce = run_official(args, stream, make_model, train, test, projection_seed(0))
    else:
        ref, ref_heads, chosen, order, ref_ce = run_reference(args, stream, make_model, train, test,
                                                              projection_seed(0), init, TRAIN_SEED)
    t2 = time.time()
    print(f"cifar10_ci, class order {order.tolist()}, {sum(len(y) // e for _, y, e in train)} training images, seed "
          f"{args.seed}, M {args.M}; ours {t1 - t0:.0f} s, reference {t2 - t1:.0f} s")
    print("| after session | test images | lambda ours / ref | ours acc % | reference acc % | identical argmax % | "
          "max abs(logit diff) | max abs(head diff) / max abs(head) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    acc_o, acc_r = [], []
    for t, ((_, y), o, r, ho, hr) in enumerate(zip(test, out, ref, our_heads, ref_heads)):
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
    if ref_ce:
        d = max(abs(a - b) for a, b in zip(our_ce, ref_ce))
        print(f"first-session training: {len(our_ce)} / {len(ref_ce)} steps, losses ours {our_ce[0]:.4f} .. "
              f"{our_ce[-1]:.4f}, reference {ref_ce[0]:.4f} .. {ref_ce[-1]:.4f}, max abs difference {d:.1e}")
    print(f"G is M x M = {args.M}^2 entries: {4 * args.M ** 2 / 2 ** 20:.0f} MiB in float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
