"""Agreement of our ``aper`` strategy with the official APER (zhoudw-zdw/RevisitingCIL ``models/aper_*.py``): the
same pretrained ViT, initial PEFT weights and training head, batches, class order, sessions and dropout masks.

The reference is not part of this repository: give a folder holding its ``models/``, ``utils/`` and ``convs/``
(``git archive`` of the mirror) with ``--reference``; this script contains none of its code. It imports the
reference's ``Learner`` (``models/aper_<adapter|ssf|vpt|finetune>.py``) and runs its ``incremental_train``
(session 0: ``_init_train`` on ``SimpleVitNet`` with a ``CosineLinear`` head, SGD, ``CosineAnnealingLR``; then
``construct_dual_branch_network`` -> ``MultiBranchCosineIncrementalNet`` [pretrained, tuned]; every session
``replace_fc``: each new class's weight = the mean of its merged training features), replacing only what ties it
to its data, downloads and hardware:

- ``utils.inc_net.get_convnet``: for the tuned branch the reference's own PEFT ViT class at our ViT's size
  (``convs/vision_transformer_adapter.py`` ``VisionTransformer``, ``convs/vision_transformer_ssf.py``
  ``VisionTransformer``, ``convs/vpt.py`` ``VPT_ViT``; for ``finetune`` our timm ViT itself, trainable) loaded with
  our pretrained weights as its ``vit_base_patch16_224_*`` builders convert timm's; for the pretrained branch our
  ViT up to its pooled features (frozen); ``Tensor.cuda`` / ``Module.cuda`` are the identity (CPU);
- its PEFT parameters and training head start from ours (copied just before ``_init_train``; rows in class order),
  and the global generator is seeded alike before training on both sides (the adapters' dropout masks);
- its loaders: our batches epoch by epoch for training (``ranpac_reference.EpochLoader``), one pass in our order for
  the prototypes, ``num_workers`` 0; timm 1.0's moved ``timm.models.layers.helpers`` / ``weight_init``: aliases;
- the data manager: ``ranpac_reference.DataManager`` (our stream's sessions, labels as class-order positions).

Ours runs through ``ctta.strategies.create("aper", model, variant=...)`` on the ``cifar10_ci`` stream (5 sessions
of 2 classes), driven segment by segment as the engine does.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/aper_reference.py --reference /tmp/aper_official \\
        --vit /tmp/vit_cifar_small.pt --data-root ../shared/data/cifar10 --train-per-class 480 \\
        --test-per-class 500 --seed 1 --epochs 5 --batch-size 48 --variant adapter

Prints per session both accuracies on the seen classes, identical argmaxes and the largest |logit difference|,
then average incremental and last accuracy, the first-session training losses of both sides and the trainable
parameters.
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
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ranpac_reference as rr  # noqa: E402  (its VIT, DataManager, EpochImages, EpochLoader, Feats, AdapterFeats)
import simplecil_reference  # noqa: E402
from harness import compare_session  # noqa: E402

MODULE = {"adapter": "aper_adapter", "ssf": "aper_ssf", "vpt_shallow": "aper_vpt", "vpt_deep": "aper_vpt",
          "finetune": "aper_finetune"}
TAG = {"adapter": "_adapter", "ssf": "_ssf", "vpt_shallow": "_vpt", "vpt_deep": "_vpt", "finetune": ""}


def timm_state(clf):
    """Our ViT's timm weights without the classifier head."""
    return {k: v for k, v in clf.net.state_dict().items() if not k.startswith("head.")}


class RefFeats(nn.Module):
    """A reference PEFT ViT (``vit``) at our size with our weights: images -> ``vit(normalize(x))`` (pooled)."""

    def __init__(self, vit, clf):
        super().__init__()
        self.normalize, self.vit, self.out_dim = clf.normalize, vit, rr.VIT["embed_dim"]

    def forward(self, x):
        return self.vit(self.normalize(x))


def ssf_backbone(clf):
    """The reference's SSF ViT (``convs/vision_transformer_ssf.py``) with our weights; its learner freezes it."""
    import convs.vision_transformer_ssf as vs  # noqa: E402  (the reference's)

    v = rr.VIT
    vit = vs.VisionTransformer(img_size=v["img_size"], patch_size=v["patch_size"], embed_dim=v["embed_dim"],
                               depth=v["depth"], num_heads=v["num_heads"], num_classes=0)
    msg = vit.load_state_dict(timm_state(clf), strict=False)
    assert not msg.unexpected_keys and all("ssf_" in k for k in msg.missing_keys), msg
    return RefFeats(vit, clf)


def vpt_backbone(clf, tokens, deep):
    """The reference's ``VPT_ViT`` (``convs/vpt.py``, as its ``build_promptmodel``) with our weights, frozen but
    the prompt tokens."""
    from convs.vpt import VPT_ViT  # noqa: E402  (the reference's)

    v = rr.VIT
    vit = VPT_ViT(img_size=v["img_size"], patch_size=v["patch_size"], embed_dim=v["embed_dim"], depth=v["depth"],
                  num_heads=v["num_heads"], Prompt_Token_num=tokens, VPT_type="Deep" if deep else "Shallow",
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
    msg = vit.load_state_dict(timm_state(clf), strict=False)
    assert not msg.unexpected_keys and set(msg.missing_keys) <= {"Prompt_Tokens", "head.weight", "head.bias"}, msg
    vit.head = nn.Identity()
    vit.Freeze()
    return RefFeats(vit, clf)


def ssf_name(ref_name):
    """Our parameter name for a reference SSF parameter (``blocks.0.attn.ssf_scale_1`` -> ``...attn.qkv.scale``)."""
    *path, leaf = ref_name.split(".")
    kind, k = leaf[4:9], leaf[-1]  # scale | shift, 1 | 2
    kind = "scale" if kind == "scale" else "shift"
    at = ".".join(path)
    if not path:
        layer = "norm"
    elif path[-1] == "patch_embed":
        layer = "patch_embed." + ("proj" if k == "1" else "norm")
    elif path[-1] == "attn":
        layer = at + (".qkv" if k == "1" else ".proj")
    elif path[-1] == "mlp":
        layer = at + (".fc1" if k == "1" else ".fc2")
    else:
        layer = at + (".norm1" if k == "1" else ".norm2")
    return f"model.net.{layer}.{kind}"


def copy_peft(variant, vit, init):
    """Our initial PEFT parameters into the reference's tuned ViT; returns how many tensors were copied."""
    n = 0
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if variant == "adapter" and "adaptmlp" in name:
                b, rest = name.split(".adaptmlp.")
                p.copy_(init["model.net." + b + ".mlp." + rest.replace("_proj", "")])
            elif variant == "ssf" and "ssf_" in name:
                p.copy_(init[ssf_name(name)])
            elif variant.startswith("vpt") and name == "Prompt_Tokens":
                if variant == "vpt_deep":
                    p.copy_(torch.stack([init[f"model.net.blocks.{i}.tokens"] for i in range(p.shape[0])]))
                else:
                    p.copy_(init["model.net.blocks.tokens"].unsqueeze(0))
            else:
                continue
            n += 1
    return n


def run_ours(stream, make_model, variant, hp, train_seed):
    import ctta

    torch.manual_seed(0)  # our PEFT initialisation (copied to the reference)
    ours = ctta.strategies.create("aper", make_model(), seed=0, variant=variant, **hp)
    init = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    head = {id(ours.train_weight), id(ours.train_sigma)}
    n_train = sum(p.numel() for p in ours.trainable_parameters() if id(p) not in head)  # the backbone's
    train, test, out, losses = [], [], [], []
    for seg in stream.segments:
        ours.segment_start(seg)
        x, y, _ = seg.materialise(torch.device("cpu"))
        if seg.kind == "train":
            train.append((x, y, int(seg.meta.get("epochs", 1))))
            if len(train) == 1:
                torch.manual_seed(train_seed)  # dropout masks drawn alike on both sides
            for i in range(0, len(x), seg.batch_size):
                o = ours.learn(x[i:i + seg.batch_size], y[i:i + seg.batch_size])
                if len(train) == 1:
                    losses.append(float(torch.nn.functional.cross_entropy(o, y[i:i + seg.batch_size])))
        else:
            test.append((x, y))
            out.append(torch.cat([ours.predict(x[i:i + seg.batch_size]) for i in range(0, len(x), seg.batch_size)]))
        ours.segment_end(seg)
    return train, test, out, init, losses, n_train


def run_reference(args, stream, make_model, train, test, init, train_seed, hp):
    sys.path.insert(0, os.path.abspath(args.reference))
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    import timm.layers.helpers
    import timm.layers.weight_init

    sys.modules.setdefault("timm.models.layers.helpers", timm.layers.helpers)  # moved in timm 1.0
    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)
    import utils.inc_net as inc  # noqa: E402  (the reference's)

    variant = args.variant
    tag = TAG[variant]
    if variant == "adapter":
        import convs.vision_transformer_adapter as vit_adapter  # noqa: E402

        tuning = types.SimpleNamespace(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                                       ffn_adapter_init_option="lora", ffn_adapter_scalar=str(hp["adapter_scale"]),
                                       ffn_num=hp["bottleneck"], d_model=rr.VIT["embed_dim"], vpt_on=False,
                                       vpt_num=0)
        tuned = lambda: rr.AdapterFeats(vit_adapter, make_model(), tuning).eval()  # noqa: E731
    elif variant == "ssf":
        tuned = lambda: ssf_backbone(make_model()).eval()  # noqa: E731
    elif variant.startswith("vpt"):
        tuned = lambda: vpt_backbone(make_model(), hp["prompt_tokens"], variant == "vpt_deep").eval()  # noqa: E731
    else:
        tuned = lambda: simplecil_reference.Feats(make_model())  # noqa: E731  (every weight trainable)

    def get_convnet(a, pretrained=False):
        name = a["convnet_type"]
        if variant == "finetune" or name.endswith(tag):
            return tuned()
        return rr.Feats(make_model())  # the pretrained branch (the tag removed)

    inc.get_convnet = get_convnet
    mod = __import__(f"models.{MODULE[variant]}", fromlist=["Learner"])
    mod.num_workers = 0
    mod.DataLoader = lambda ds, batch_size, shuffle, num_workers: (
        rr.EpochLoader(ds, batch_size) if isinstance(ds, rr.EpochImages) else DataLoader(ds, batch_size=batch_size))
    order = list(stream.spec["class_order"])
    losses, copied = [], []
    init_train = mod.Learner._init_train

    def started_alike(self, train_loader, test_loader, optimizer, scheduler):
        net = self._network
        vit = getattr(net.convnet, "vit", None)
        if vit is not None:
            copied.append(copy_peft(variant, vit, init))
        with torch.no_grad():  # our training head (rows in class order)
            net.fc.weight.copy_(init["train_weight"][torch.tensor(order[:net.fc.out_features])])
            net.fc.sigma.copy_(init["train_sigma"])
        copied.append(sum(p.numel() for n, p in net.convnet.named_parameters()
                          if p.requires_grad and "head." not in n))  # its ViT's (a head without gradient aside)
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

    mod.Learner._init_train = started_alike
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    sessions = stream.spec["sessions"]
    dm = rr.DataManager(sessions, train, test, position)
    targets = position[train[0][1]]
    learner = mod.Learner({"memory_size": 0, "device": [torch.device("cpu")], "model_name": MODULE[variant],
                           "convnet_type": "pretrained_vit_b16_224" + tag, "init_cls": len(sessions[0]),
                           "batch_size": stream.segments[0].batch_size, "init_lr": hp["lr"],
                           "weight_decay": hp["weight_decay"], "min_lr": hp["min_lr"], "optimizer": "sgd",
                           "tuned_epoch": train[0][2], "ffn_num": hp["bottleneck"],
                           "vpt_type": "deep" if variant == "vpt_deep" else "shallow",
                           "prompt_token_num": hp["prompt_tokens"]})
    logits = []
    for t in range(len(sessions)):
        learner.incremental_train(dm)
        net = learner._network.eval()
        with torch.no_grad():
            logits.append(torch.cat([net(x)["logits"] for _, x, _ in learner.test_loader]))
        learner.after_task()
    b = stream.segments[0].batch_size
    ce = [float(torch.nn.functional.cross_entropy(o, targets[i * b:(i + 1) * b])) for i, o in enumerate(losses)]
    return logits, torch.tensor(order), ce, copied


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="folder with the reference's models/, utils/, convs/")
    ap.add_argument("--vit", required=True, help="the small pretrained ViT (benchmarks/pretrain_vit.py)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--variant", choices=sorted(MODULE), default="adapter")
    ap.add_argument("--train-per-class", type=int, default=480)
    ap.add_argument("--test-per-class", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=None, help="default: configs/strategies/aper.yaml")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta
    from ctta.config import strategy_defaults

    hp = {k: v for k, v in strategy_defaults("aper").items() if k != "variant"}
    if args.lr is not None:
        hp["lr"] = args.lr

    def make_model():
        return ctta.backbones.create("vit_tiny_patch16_224", num_classes=10, weights=args.vit, **rr.VIT).eval()

    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed,
                                 train_per_class=args.train_per_class, test_per_class=args.test_per_class or None,
                                 epochs=args.epochs, batch_size=args.batch_size)
    t0 = time.time()
    train, test, out, init, our_ce, n_ours = run_ours(stream, make_model, args.variant, hp, rr.TRAIN_SEED)
    t1 = time.time()
    ref, order, ref_ce, copied = run_reference(args, stream, make_model, train, test, init, rr.TRAIN_SEED, hp)
    t2 = time.time()
    print(f"aper {args.variant}, cifar10_ci, class order {order.tolist()}, "
          f"{sum(len(y) // e for _, y, e in train)} training images, {train[0][2]} epochs in session 0, batch "
          f"{args.batch_size}, lr {hp['lr']}, seed {args.seed}; ours {t1 - t0:.0f} s, reference {t2 - t1:.0f} s")
    print("| after session | test images | ours acc % | reference acc % | identical argmax % | max abs(logit diff) |")
    print("| --- | --- | --- | --- | --- | --- |")
    acc_o, acc_r = [], []
    for t, ((_, y), o, r) in enumerate(zip(test, out, ref)):
        a_o, a_r, same, diff = compare_session(y, o, r, order)
        acc_o.append(a_o)
        acc_r.append(a_r)
        print(f"| {t} | {len(y)} | {a_o:.2f} | {a_r:.2f} | {same:.2f} | {diff:.1e} |")
    print(f"average incremental accuracy: ours {np.mean(acc_o):.2f}, reference {np.mean(acc_r):.2f}; "
          f"last: ours {acc_o[-1]:.2f}, reference {acc_r[-1]:.2f}")
    d = max(abs(a - b) for a, b in zip(our_ce, ref_ce))
    print(f"first-session training: {len(our_ce)} / {len(ref_ce)} steps, losses ours {our_ce[0]:.4f} .. "
          f"{our_ce[-1]:.4f}, reference {ref_ce[0]:.4f} .. {ref_ce[-1]:.4f}, max abs difference {d:.1e}")
    print(f"trainable backbone parameters in session 0: ours {n_ours}, reference {copied[-1]}; "
          f"PEFT tensors copied to the reference: {copied[0] if len(copied) > 1 else 0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
