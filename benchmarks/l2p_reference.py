"""Agreement of our ``l2p`` and ``dualprompt`` strategies with LAMDA-PILOT's (sun-hailong/LAMDA-PILOT@2647455
``models/l2p.py``, ``models/dualprompt.py``, ``backbone/vit_l2p.py``, ``backbone/vit_dualprompt.py``,
``backbone/prompt.py``, ``exps/l2p.json``, ``exps/dualprompt.json``): the same ViT weights, initial prompts, keys and
head, training batches, class order, epochs, test batches and hyperparameters.

The reference is not part of this repository: give a folder holding its ``models/``, ``utils/``, ``backbone/`` and
``exps/`` (``git archive`` of the mirror) with ``--reference``; this script contains none of its code. It builds the
reference's ``Learner`` (``PromptVitNet``: its prompted ViT and its ``original_backbone`` for the query) from its
``exps/<method>.json`` with our hyperparameters, and per session does what its ``incremental_train`` does
(``_cur_task`` + 1, ``_total_classes``, then its ``_train``: optimiser, ``_init_prompt``, ``reinit_optimizer``,
``_init_train``) and evaluates with its ``_eval_cnn``, replacing only what ties it to its data and hardware:

- the ViT: its own ``VisionTransformer`` classes (``vit_l2p`` / ``vit_dualprompt``) registered in timm under
  ``vit_ours_<method>`` with our small ViT's shape (img 32, patch 8, depth 4, width 128, 4 heads) instead of a
  downloaded ViT-B/16 (``pretrained`` false), then our ViT's weights loaded into both of its ViTs; L2P's longer
  ``pos_embed`` is filled as its ``resize_pos_embed`` fills it from a pretrained one (the [CLS] entry repeated over
  the prompt positions, the patch grid unchanged);
- the initial prompts, keys (and DualPrompt's G-prompts) and head rows: copied from ours (head rows in class order,
  as its data manager relabels classes by their position in the order);
- timm 1.0's moved ``timm.models.layers.weight_init`` (imported by its ``backbone/linears.py``): an alias;
- the loaders: its train loader yields our train segment's batches epoch by epoch, its test loader our eval
  segment's batches (labels as class-order positions; images through our model's input normalisation); CPU.

Layer indices: our ViT has 4 blocks, so DualPrompt's ``g_prompt_layer_idx`` [0, 1] and ``e_prompt_layer_idx``
[2, 3, 4] become [0, 1] and [2, 3] on both sides (other choices: ``--set g_layers=[..]``).

``--fix-kv-reshape`` (DualPrompt): the reference's ``EPrompt.forward`` reshapes the selected prefixes
(layers, 2, B, ...) to (layers, B, 2, ...) without a permute, so within a batch the key and value halves of the
E-prompt are mixed across samples (first half of a batch: key and value both from the key half; second half: both
from the value half). The paper's prefix tuning (and ours) gives every sample its key half as keys and value half as
values; with this flag the reference's reshape is replaced by the permute (one line, in a subclass of its
``EPrompt``), the rest of its code unchanged.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/l2p_reference.py --method l2p --reference /tmp/l2p_ref \\
        --vit /tmp/vit_cifar_small.pt --data-root ../shared/data/cifar10 --train-per-class 192 \\
        --test-per-class 100 --epochs 3 --seed 1

Prints per session both accuracies on the seen classes, identical argmaxes and the largest |logit difference|,
then average incremental and last accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coso_reference import VIT, EpochLoader, make_model  # noqa: E402  (the small ViT, the epoch-by-epoch loader)
from harness import compare_session  # noqa: E402


def run_ours(stream: Any, method: str, model: nn.Module, hp: Dict[str, Any]):
    """Ours over the stream; returns the strategy, its initial state, per-session train batches, test batches and
    predictions."""
    import ctta

    ours = ctta.strategies.create(method, model, **{"seed": 0, **hp})
    init = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    train, test, out = [], [], []
    for seg in stream.segments:
        ours.segment_start(seg)
        x, y, _ = seg.materialise(torch.device("cpu"))
        bs = seg.batch_size
        batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]
        if seg.kind == "train":
            train.append(batches)
            for xb, yb in batches:
                ours.learn(xb, yb)
        else:
            test.append(batches)
            out.append(torch.cat([ours.predict(xb) for xb, _ in batches]))
        ours.segment_end(seg)
    return ours, init, train, test, out


def _register_vit(method: str) -> str:
    """Register the reference's ViT class in timm with our ViT's shape; returns the model name."""
    import timm
    from timm.models import register_model

    name = f"vit_ours_{method}"
    if name in timm.list_models(name):
        return name
    if method == "l2p":
        import backbone.vit_l2p as vit  # noqa: E402  (the reference's)
    else:
        import backbone.vit_dualprompt as vit  # noqa: E402

    def factory(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        return vit.VisionTransformer(**VIT, **kwargs)

    factory.__name__ = name
    factory.__module__ = __name__
    register_model(factory)
    return name


def _load_vit(ref_vit: nn.Module, ours_net: nn.Module) -> None:
    """Our timm ViT's weights into the reference's ViT (same names); a longer ``pos_embed`` (L2P: prompt positions)
    gets the [CLS] entry over the prompt positions, as the reference's ``resize_pos_embed``."""
    sd = {k: v.detach().clone() for k, v in ours_net.state_dict().items()}
    pos = sd["pos_embed"]
    want = ref_vit.pos_embed.shape[1]
    if want != pos.shape[1]:
        extra = want - pos.shape[1]
        sd["pos_embed"] = torch.cat([pos[:, :1].expand(-1, extra + 1, -1), pos[:, 1:]], dim=1)
    missing, unexpected = ref_vit.load_state_dict(sd, strict=False)
    bad_missing = [k for k in missing if not k.startswith(("prompt.", "e_prompt.", "g_prompt"))]
    if bad_missing or unexpected:
        raise RuntimeError(f"weights do not map: missing {bad_missing}, unexpected {unexpected}")


def _position(order: List[int]) -> Tensor:
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    return position


def run_reference(args: argparse.Namespace, ours: Any, init: Dict[str, Tensor], stream: Any, train, test,
                  hp: Dict[str, Any]):
    """The reference's learner over the same sessions; returns its eval logits (over the seen classes, in class
    order) per session and the class order."""
    sys.path.insert(0, os.path.abspath(args.reference))
    import timm.layers.weight_init

    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)  # moved in timm 1.0
    name = _register_vit(args.method)
    with open(os.path.join(args.reference, "exps", f"{args.method}.json")) as f:
        config = json.load(f)
    order = list(stream.spec["class_order"])
    sessions = stream.spec["sessions"]
    position = _position(order)
    config.update({"backbone_type": name, "pretrained": False, "nb_classes": len(order),
                   "nb_tasks": len(sessions), "device": [torch.device("cpu")],
                   "tuned_epoch": int(stream.spec["epochs"]), "batch_size": int(stream.spec["batch_size"]),
                   "init_lr": hp["lr"], "weight_decay": hp["weight_decay"], "size": hp["pool_size"],
                   "length": hp["length"], "top_k": hp["top_k"], "batchwise_prompt": hp["batchwise_prompt"],
                   "pull_constraint_coeff": hp["pull_constraint_coeff"]})
    if args.method == "l2p":
        config.update({"use_prompt_mask": hp["use_prompt_mask"], "head_type": hp["head_type"]})
        import models.l2p as learner_module  # noqa: E402  (the reference's)
    else:  # its config's use_prompt_mask true, head_type token: ours always
        config.update({"g_prompt_length": hp["g_prompt_length"], "g_prompt_layer_idx": list(hp["g_layers"]),
                       "e_prompt_layer_idx": list(hp["e_layers"]), "shared_prompt_pool": hp["shared_prompt_pool"],
                       "use_prompt_mask": True, "head_type": "token", "use_prefix_tune_for_g_prompt": True,
                       "use_prefix_tune_for_e_prompt": True, "use_g_prompt": True, "use_e_prompt": True,
                       "same_key_value": False})
        if args.fix_kv_reshape:
            _patch_kv_reshape()
        import models.dualprompt as learner_module  # noqa: E402
    learner = learner_module.Learner(config)
    learner.topk = 1
    net = learner._network
    model = ours.model
    _load_vit(net.backbone, model.net)
    _load_vit(net.original_backbone, model.net)
    _copy_initial(args.method, net.backbone, init, ours, position, order)
    logits = []
    epochs = int(stream.spec["epochs"])
    for t, cls in enumerate(sessions):
        batches = train[t]
        per_epoch = len(batches) // epochs
        assert per_epoch * epochs == len(batches), "epoch boundaries must fall on batch boundaries"
        mapped = [[(model.normalize(x), position[y]) for x, y in batches[e * per_epoch:(e + 1) * per_epoch]]
                  for e in range(epochs)]
        tests = [(None, model.normalize(x), position[y]) for x, y in test[t]]
        learner._cur_task += 1
        learner._total_classes = learner._known_classes + len(cls)
        learner._train(EpochLoader(mapped), tests)
        net.eval()
        with torch.no_grad():
            lg = torch.cat([net(x, task_id=learner._cur_task)["logits"][:, :learner._total_classes]
                            for _, x, _ in tests])
        y_pred, _ = learner._eval_cnn(tests)
        assert torch.equal(torch.from_numpy(y_pred[:, 0]), lg.argmax(1))
        logits.append(lg)
        learner.after_task()
    return logits, torch.tensor(order)


def _copy_initial(method: str, vit: nn.Module, init: Dict[str, Tensor], ours: Any, position: Tensor,
                  order: List[int]) -> None:
    """Ours' initial prompts, keys (G-prompts) and head rows (in class order) into the reference's ViT."""
    heads, hd = vit.blocks[0].attn.num_heads, VIT["embed_dim"] // VIT["num_heads"]
    with torch.no_grad():
        if method == "l2p":
            vit.prompt.prompt.copy_(init["pool.prompts"])
            vit.prompt.prompt_key.copy_(init["pool.keys"])
        else:
            e = init["e_pool.prompts"]  # pool x layers x 2 x length x D -> layers x 2 x pool x length x H x hd
            vit.e_prompt.prompt.copy_(e.permute(1, 2, 0, 3, 4).reshape(*e.shape[1:3], e.shape[0], e.shape[3],
                                                                        heads, hd))
            vit.e_prompt.prompt_key.copy_(init["e_pool.keys"])
            g = init["g_prompt"]  # layers x 2 x length x D
            vit.g_prompt.copy_(g.reshape(*g.shape[:3], heads, hd))
        w, b = (init[f"model.{n}"] for n in ours.head_names)
        idx = torch.tensor(order)
        vit.head.weight.copy_(w[idx])
        vit.head.bias.copy_(b[idx])


def _patch_kv_reshape() -> None:
    """``--fix-kv-reshape``: the reference's ``EPrompt.forward`` output with its (layers, 2, B, ...) ->
    (layers, B, 2, ...) reshape undone (the memory is reinterpreted back) and done as a permute instead (see the
    module docstring); nothing else changes."""
    import backbone.prompt as prompt  # noqa: E402  (the reference's)

    forward = prompt.EPrompt.forward

    def fixed(self, *a, **k):
        out = forward(self, *a, **k)
        bp = out["batched_prompt"]
        if self.prompt_pool and self.use_prefix_tune_for_e_prompt:
            layers, batch, dual = bp.shape[:3]
            out["batched_prompt"] = bp.reshape(layers, dual, batch, *bp.shape[3:]).permute(0, 2, 1, 3, 4, 5)
        return out

    prompt.EPrompt.forward = fixed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["l2p", "dualprompt"], default="l2p")
    ap.add_argument("--reference", required=True, help="folder with the reference's models/, utils/, backbone/, exps/")
    ap.add_argument("--vit", required=True, help="benchmarks/pretrain_vit.py's checkpoint ('' : random init)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train-per-class", type=int, default=192)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="train and test batches (the reference's 16 / 24)")
    ap.add_argument("--seed", type=int, default=1, help="the stream's seed (class order, subsets, batches)")
    ap.add_argument("--set", action="append", default=[], help="ours' hyperparameter KEY=JSON (both sides)")
    ap.add_argument("--fix-kv-reshape", action="store_true", help="dualprompt: see the module docstring")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta
    from ctta.config import strategy_defaults

    hp = dict(strategy_defaults(args.method))
    for kv in args.set:
        k, v = kv.split("=", 1)
        hp[k] = json.loads(v)
    if args.method == "dualprompt":  # our ViT has 4 blocks: the reference's e-layers [2, 3, 4] cut to [2, 3]
        hp.setdefault("g_layers", [0, 1])
        hp["e_layers"] = [i for i in hp.get("e_layers", [2, 3, 4]) if i < VIT["depth"]]
    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed, epochs=args.epochs,
                                 batch_size=args.batch_size, train_per_class=args.train_per_class,
                                 test_per_class=args.test_per_class or None)
    t0 = time.time()
    ours, init, train, test, out = run_ours(stream, args.method, make_model(args.vit), hp)
    t1 = time.time()
    ref, order = run_reference(args, ours, init, stream, train, test, hp)
    t2 = time.time()
    print(f"{args.method}: cifar10_ci, class order {order.tolist()}, {sum(len(y) for s in train for _, y in s)} "
          f"training samples (epochs {args.epochs}, batch {args.batch_size}), stream seed {args.seed}"
          f"{', reference kv reshape fixed' if args.fix_kv_reshape else ''}; ours {t1 - t0:.0f} s, reference "
          f"{t2 - t1:.0f} s")
    print("| after session | test images | ours accuracy % | reference accuracy % | identical argmax % | "
          "max abs(logit difference) |")
    print("| --- | --- | --- | --- | --- | --- |")
    acc_o, acc_r, rows = [], [], []
    for t, (batches, o, r) in enumerate(zip(test, out, ref)):
        y = torch.cat([yb for _, yb in batches])
        a_o, a_r, same, diff = compare_session(y, o, r, order)
        acc_o.append(a_o)
        acc_r.append(a_r)
        rows.append({"session": t, "ours": acc_o[-1], "reference": acc_r[-1], "identical": same, "max_diff": diff})
        print(f"| {t} | {len(y)} | {acc_o[-1]:.2f} | {acc_r[-1]:.2f} | {same:.2f} | {diff:.1e} |")
    avg = (sum(acc_o) / len(acc_o), sum(acc_r) / len(acc_r))
    print(f"average incremental accuracy: ours {avg[0]:.2f}, reference {avg[1]:.2f}; last accuracy: ours "
          f"{acc_o[-1]:.2f}, reference {acc_r[-1]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "avg": avg, "last": (acc_o[-1], acc_r[-1])}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
