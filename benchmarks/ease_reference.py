"""Agreement of our ``ease`` strategy with LAMDA-PILOT's EASE (sun-hailong/LAMDA-PILOT ``models/ease.py``): the same
pretrained ViT, initial adapters and proxy heads, training batches, dropout masks, class order and sessions.

The reference is not part of this repository: give a folder holding its ``models/``, ``utils/`` and ``backbone/`` with
``--reference`` (``git archive`` of the mirror); this script contains none of its code. It imports the reference's
``Learner`` and runs its ``incremental_train`` (``update_fc``: a new ``proxy_fc`` and a grown ``EaseCosineLinear``
``fc``; ``_train`` / ``_init_train``: SGD + ``CosineAnnealingLR`` on the current adapter and the proxy head;
``replace_fc``: prototypes in every subspace through ``forward_proto``, then ``solve_sim_reset``), evaluates its
network (``forward_test`` + ``forward_reweight``) on our test images and calls its ``after_task`` (freeze, new
adapter), replacing only what ties it to its data, hardware and ViT-B/16 download:

- ``utils.inc_net.get_backbone``: its own ``backbone/vit_ease.py`` ``VisionTransformer`` built at our small ViT's
  shape (img 32, patch 8, depth 4, width 128, 4 heads) with PILOT's EASE tuning config (``ffn_num`` 64, parallel,
  scalar 0.1, init lora, no layer norm), loaded with our ViT's weights as its ``vit_base_patch16_224_ease`` converts
  timm's (qkv split into q/k/v, ``mlp.fc*`` -> ``fc*``; only the adapters train, its rule), our input normalisation
  in front of its patch embedding; device CPU;
- ``EaseCosineLinear.forward_reweight``: called with ``out_dim`` = 128 (``EaseNet.forward`` leaves its default 768,
  ViT-B's width, which would see no subspace in a 128-wide feature);
- ``_init_train``: before it, session ``t``'s adapter and proxy head get our initial values (the proxy rows in class
  order, sigma 1) and the global generator is seeded with ``TRAIN_SEED + t`` (the adapters' dropout masks; ours is
  seeded alike before the session's first batch);
- its loaders: our train segment's batches epoch by epoch (``ranpac_reference.EpochLoader``), the prototype and
  test loaders unshuffled in our order, ``num_workers`` 0; the data manager: ``ranpac_reference.DataManager``
  (session ``t``'s training images; the test images of our eval segment after session ``t``; labels as class-order
  positions); its ``tqdm`` bar off.

Ours runs through ``ctta.strategies.create("ease", model)`` (configs/strategies/ease.yaml values) on the
``cifar10_ci`` stream (5 sessions of 2 classes), driven segment by segment as the engine does.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/ease_reference.py --reference /tmp/ease_ref \\
        --vit /tmp/vit_cifar_small.pt --data-root ../shared/data/cifar10 --train-per-class 192 \\
        --test-per-class 100 --epochs 3 --batch-size 48 --seed 1

Prints per session both accuracies on the seen classes, identical argmaxes, the largest |logit difference| and
|prototype difference| (all subspaces, synthesised ones included), then average incremental and last accuracy, the
training losses of both sides and (``--speed-reps``) both sides' train / test images per second after the last
session, timed alternately.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ranpac_reference import VIT, DataManager, EpochImages, EpochLoader  # noqa: E402

TRAIN_SEED = 12345  # + session: the global torch generator before each session's training, both sides


def load_config(path: str) -> dict:
    """Our configs/strategies/ease.yaml hyperparameters (the reference gets the same values)."""
    import yaml

    with open(path) as fh:
        return dict(yaml.safe_load(fh)["hparams"])


def run_ours(stream, make_model, hp):
    import ctta

    ours = ctta.strategies.create("ease", make_model(), seed=0, **hp)
    inits = []  # per session: the new adapter's and the proxy head's values before training
    begin = ours.begin_session

    def recording(session):
        begin(session)
        k = ours.num_subspaces - 1
        inits.append({"adapters": [{n: p.detach().clone() for n, p in s.adapters[k].named_parameters()}
                                   for s in ours.sets],
                      "weight": ours.train_weight.detach().clone(), "sigma": ours.train_sigma.detach().clone()})

    ours.begin_session = recording
    train, test, out, protos, losses = [], [], [], [], []
    for seg in stream.segments:
        ours.segment_start(seg)
        x, y, _ = seg.materialise(torch.device("cpu"))
        if seg.kind == "train":
            train.append((x, y, int(seg.meta.get("epochs", 1))))
            torch.manual_seed(TRAIN_SEED + len(train) - 1)
            for i in range(0, len(x), seg.batch_size):
                o = ours.learn(x[i:i + seg.batch_size], y[i:i + seg.batch_size])
                losses.append(float(F.cross_entropy(o, y[i:i + seg.batch_size])))
        else:
            test.append((x, y))
            out.append(torch.cat([ours.predict(x[i:i + seg.batch_size]) for i in range(0, len(x), seg.batch_size)]))
            protos.append(ours.protos.clone())
        ours.segment_end(seg)
    return ours, train, test, out, protos, inits, losses


class NormalizedPatches(nn.Module):
    """Our input normalisation, then the reference's patch embedding (its ViT reads raw images otherwise)."""

    def __init__(self, normalize, patch_embed):
        super().__init__()
        self.normalize, self.embed = normalize, patch_embed

    def forward(self, x):
        return self.embed(self.normalize(x))


class Quiet(list):
    """Its progress bar, silent: the epochs, and a ``set_description`` that prints nothing."""

    def set_description(self, info):
        return None


def reference_backbone(vit_ease, clf, hp):
    """The reference's ``vit_ease.VisionTransformer`` at our ViT's shape, loaded with our weights."""
    tuning = types.SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                                   ffn_adapter_init_option="lora", ffn_adapter_scalar=str(hp["adapter_scale"]),
                                   ffn_num=hp["bottleneck"], d_model=VIT["embed_dim"], vpt_on=False, vpt_num=0,
                                   _device="cpu")
    vit = vit_ease.VisionTransformer(
        img_size=VIT["img_size"], patch_size=VIT["patch_size"], embed_dim=VIT["embed_dim"], depth=VIT["depth"],
        num_heads=VIT["num_heads"], mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0, global_pool=False, drop_path_rate=0.0, tuning_config=tuning)
    d = VIT["embed_dim"]
    state = {}
    for k, v in clf.net.state_dict().items():  # as its vit_base_patch16_224_ease converts timm's
        if k.startswith("head."):
            continue
        if "qkv." in k:
            for part, w in zip("qkv", (v[:d], v[d:2 * d], v[2 * d:])):
                state[k.replace("qkv.", f"{part}_proj.")] = w
        else:
            state[k.replace("mlp.fc", "fc")] = v
    msg = vit.load_state_dict(state, strict=False)
    assert not msg.unexpected_keys and all("cur_adapter" in k for k in msg.missing_keys), msg
    for n, p in vit.named_parameters():
        p.requires_grad = n in msg.missing_keys  # its rule: only what the checkpoint lacks trains
    vit.patch_embed = NormalizedPatches(clf.normalize, vit.patch_embed)
    vit.out_dim = d
    return vit.eval()


def run_reference(args, stream, make_model, train, test, inits, hp, ours=None, reps=0):
    sys.path.insert(0, os.path.abspath(args.reference))
    import timm.layers.weight_init

    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)  # moved in timm 1.0
    import backbone.linears as linears  # noqa: E402  (the reference's)
    import backbone.vit_ease as vit_ease  # noqa: E402
    import utils.inc_net as inc  # noqa: E402

    inc.get_backbone = lambda a, pretrained=False: reference_backbone(vit_ease, make_model(), hp)
    reweight = linears.EaseCosineLinear.forward_reweight

    def reweight_at_our_width(self, input, cur_task, alpha=0.1, beta=0.0, init_cls=10, inc=10, out_dim=768,
                              use_init_ptm=False):
        return reweight(self, input, cur_task, alpha, beta, init_cls, inc, VIT["embed_dim"], use_init_ptm)

    linears.EaseCosineLinear.forward_reweight = reweight_at_our_width
    import models.ease as ease  # noqa: E402

    ease.num_workers = 0
    ease.tqdm = Quiet
    ease.DataLoader = lambda ds, batch_size, shuffle, num_workers: (
        EpochLoader(ds, batch_size) if isinstance(ds, EpochImages) else DataLoader(ds, batch_size=batch_size))
    order = list(stream.spec["class_order"])
    sessions = stream.spec["sessions"]
    losses = []
    init_train = ease.Learner._init_train

    def started_alike(self, train_loader, test_loader, optimizer, scheduler):
        t = self._cur_task
        net = self._network
        with torch.no_grad():  # our initial adapter and proxy head of this session (rows in class order)
            for block, ours in zip(net.backbone.cur_adapter, inits[t]["adapters"]):
                for n, p in block.named_parameters():
                    p.copy_(ours[n.replace("_proj", "")])
            net.proxy_fc.weight.copy_(inits[t]["weight"][torch.tensor(order[self._known_classes:self._total_classes])])
            net.proxy_fc.sigma.copy_(inits[t]["sigma"])
        fwd = net.forward

        def recording(x, test=False):
            o = fwd(x, test=test)
            if net.training:
                losses.append((o["logits"].detach(), t, self._known_classes))
            return o

        net.forward = recording
        torch.manual_seed(TRAIN_SEED + t)
        init_train(self, train_loader, test_loader, optimizer, scheduler)
        net.forward = fwd

    ease.Learner._init_train = started_alike
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    dm = DataManager(sessions, train, test, position)
    epochs = train[0][2]
    learner = ease.Learner({
        "memory_size": 0, "device": [torch.device("cpu")], "backbone_type": "vit_small_ease_ours",
        "model_name": "ease", "batch_size": stream.segments[0].batch_size, "init_lr": hp["lr"],
        "later_lr": hp["lr"], "init_epochs": epochs, "later_epochs": epochs, "weight_decay": hp["weight_decay"],
        "min_lr": hp["min_lr"], "optimizer": "sgd", "scheduler": "cosine", "init_cls": len(sessions[0]),
        "increment": len(sessions[1]), "ffn_num": hp["bottleneck"], "use_diagonal": False,
        "recalc_sim": hp["recalc_sim"], "alpha": hp["alpha"], "use_init_ptm": False, "beta": 0,
        "use_old_data": False, "use_reweight": hp["use_reweight"], "moni_adam": False, "adapter_num": -1})
    logits, protos, speed = [], [], None
    for t in range(len(sessions)):
        learner.incremental_train(dm)
        net = learner._network.eval()
        with torch.no_grad():
            logits.append(torch.cat([net(x, test=True)["logits"] for _, x, _ in learner.test_loader]))
        protos.append(net.fc.weight.detach().clone())
        if t == len(sessions) - 1 and ours is not None:
            speed = interleaved_speed(ours, learner, train[t], test[t], stream.segments[0].batch_size, reps)
        learner.after_task()
    ce, offset = [], [0] * len(train)
    for o, t, known in losses:  # its aux targets: class-order position - known classes, our batches in order
        y = position[train[t][1]][offset[t]:offset[t] + o.shape[0]]
        offset[t] += o.shape[0]
        ce.append(float(F.cross_entropy(o, y - known)))
    return logits, protos, torch.tensor(order), ce, speed


def interleaved_speed(ours, learner, train, test, batch, reps):
    """Per-batch seconds (medians over ``reps``, the two sides alternating so the shared CPU's load hits both
    alike) of one training step (forward, backward, SGD step; the reference's as its ``_init_train``) and of one
    test batch through every subspace, after the last session (before its ``after_task``)."""
    net = learner._network
    x, y = train[0][:batch], train[1][:batch]
    xt = test[0][:batch]
    known = learner._known_classes
    aux = torch.randint(0, learner._total_classes - known, (len(x),), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def ref_step():
        net.train()
        F.cross_entropy(net(x, test=False)["logits"], aux).backward()
        opt.step()
        opt.zero_grad()

    def ref_test():
        net.eval()
        with torch.no_grad():
            net(xt, test=True)

    k = ours.protos.shape[0]
    ours_test = lambda: ours.predict(xt)  # noqa: E731
    times = {"ours test": [], "reference test": [], "ours train": [], "reference train": []}
    for _ in range(reps):
        for name, fn in (("ours test", ours_test), ("reference test", ref_test)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ours.learn(x, y)  # opens a new session (its adapter): not timed
    for _ in range(reps):
        for name, fn in (("ours train", lambda: ours.learn(x, y)), ("reference train", ref_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {n: float(np.median(v)) for n, v in times.items()}, k, len(x)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="folder with the reference's models/, utils/, backbone/")
    ap.add_argument("--vit", required=True, help="the small pretrained ViT (benchmarks/pretrain_vit.py)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--config", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                                                     "strategies", "ease.yaml"))
    ap.add_argument("--train-per-class", type=int, default=192)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed-reps", type=int, default=10, help="interleaved timing repetitions (0: none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta

    hp = load_config(args.config)

    def make_model():
        return ctta.backbones.create("vit_tiny_patch16_224", num_classes=10, weights=args.vit, **VIT).eval()

    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed,
                                 train_per_class=args.train_per_class, test_per_class=args.test_per_class or None,
                                 epochs=args.epochs, batch_size=args.batch_size)
    t0 = time.time()
    ours, train, test, out, our_protos, inits, our_ce = run_ours(stream, make_model, hp)
    t1 = time.time()
    ref, ref_protos, order, ref_ce, speed = run_reference(args, stream, make_model, train, test, inits, hp,
                                                          ours if args.speed_reps else None, args.speed_reps)
    t2 = time.time()
    print(f"cifar10_ci, class order {order.tolist()}, {sum(len(y) // e for _, y, e in train)} training images, "
          f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}; ours {t1 - t0:.0f} s, reference "
          f"{t2 - t1:.0f} s")
    print("| after session | test images | ours acc % | reference acc % | identical argmax % | max abs(logit diff) | "
          "max abs(prototype diff) / max abs(prototype) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    acc_o, acc_r = [], []
    for t, ((_, y), o, r, po, pr) in enumerate(zip(test, out, ref, our_protos, ref_protos)):
        seen = order[:r.shape[1]]
        a_ours, a_ref = o.argmax(1), seen[r.argmax(1)]
        acc_o.append(100 * float((a_ours == y).float().mean()))
        acc_r.append(100 * float((a_ref == y).float().mean()))
        po = po[:, seen].transpose(0, 1).reshape(len(seen), -1)  # ours K x C x D -> its C_seen x K D
        dp = float((po - pr).abs().max() / pr.abs().max())
        print(f"| {t} | {len(y)} | {acc_o[-1]:.2f} | {acc_r[-1]:.2f} | "
              f"{100 * float((a_ours == a_ref).float().mean()):.2f} | {float((o[:, seen] - r).abs().max()):.1e} | "
              f"{dp:.1e} |")
    print(f"average incremental accuracy: ours {np.mean(acc_o):.2f}, reference {np.mean(acc_r):.2f}; "
          f"last: ours {acc_o[-1]:.2f}, reference {acc_r[-1]:.2f}")
    d = max(abs(a - b) for a, b in zip(our_ce, ref_ce))
    print(f"training: {len(our_ce)} / {len(ref_ce)} steps, losses ours {our_ce[0]:.4f} .. {our_ce[-1]:.4f}, "
          f"reference {ref_ce[0]:.4f} .. {ref_ce[-1]:.4f}, max abs difference {d:.1e}")
    if speed:
        sec, k, b = speed
        print(f"speed after the last session (batch {b}, {k} subspaces, medians of {args.speed_reps} interleaved "
              f"runs): train {b / sec['ours train']:.0f} img/s ours, {b / sec['reference train']:.0f} reference; "
              f"test {b / sec['ours test']:.0f} img/s ours, {b / sec['reference test']:.0f} reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
