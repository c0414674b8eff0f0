"""Agreement of our ``coda_prompt`` strategy with LAMDA-PILOT's CODA-Prompt (sun-hailong/LAMDA-PILOT@2647455
``models/coda_prompt.py``, ``backbone/prompt.py`` ``CodaPrompt``, ``backbone/vit_coda_promtpt.py``): the same ViT,
initial components / keys / attention vectors / head, training batches, class order, epochs and test images.

The reference is not part of this repository: give a folder holding its ``models/``, ``utils/`` and ``backbone/``
with ``--reference`` (``git archive`` of the mirror); this script contains none of its code. It builds the
reference's ``Learner`` and, per session, does what its ``incremental_train`` does (``_cur_task`` + 1,
``prompt.process_task_count()`` after the first task, ``_total_classes``, then its ``_train`` unchanged: Adam over
``prompt`` + ``fc``, ``CosineSchedule`` over ``tuned_epoch`` = our epochs, ``_init_train``), then evaluates with its
``_eval_cnn``; replaced are only what ties it to its data, downloads and ViT-B's width:

- ``utils.inc_net.get_backbone``: the reference's own ``VisionTransformer`` (``backbone/vit_coda_promtpt.py``) built
  with our small ViT's shape (img 32, patch 8, depth 4, width 128, 4 heads) holding our ViT's weights (no timm
  download); its input is our normalised images (our ``Classifier`` normalises inside);
- ``CodaPromptVitNet``'s hard-coded 768: ``fc`` = ``nn.Linear(128, 10)`` and ``prompt`` = its ``CodaPrompt(128,
  tasks, prompt_param, key_dim=128)``; its ``e_layers`` [0..4] stay (block 4 does not exist at depth 4, so blocks
  0-3 are prompted, as ours: ``prompt_layers`` null = 0-4 capped at the depth);
- equal starts (``--inits ours``, the default): its ``fc`` rows = our fresh head's rows in class order; its
  components / keys / attention vectors of task t = ours (copied after its ``process_task_count`` re-drew them with
  its own Gram-Schmidt); ``--inits own``: its own draws under ``torch.manual_seed(--init-seed)``;
- the loaders: its train loader yields our train segment's batches epoch by epoch (labels as class-order positions,
  as its data manager relabels; batch size divides the session, so its ``drop_last`` drops nothing);
- timm 1.0's moved ``timm.models.layers.weight_init``: an alias; in its ViT module ``torch.zeros`` returns a copy
  (its ``prompt_loss`` leaf is copied by ``.to(device)`` on a GPU only; on the CPU its in-place ``+=`` fails).

    OMP_NUM_THREADS=1 python benchmarks/coda_prompt_reference.py --reference /tmp/coda_ref \\
        --vit /tmp/vit_cifar_small.pt --data-root ../shared/data/cifar10 --train-per-class 192 \\
        --test-per-class 100 --epochs 3 --batch-size 32 --seed 1

Prints per session both accuracies on the seen classes, identical argmaxes and the largest |logit difference|, then
average incremental and last accuracy, and the largest change of a finished task's components during later tasks
on the reference's side (ours: tests/test_coda_prompt.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coso_reference import VIT, EpochLoader, make_model  # noqa: E402
from harness import compare_session  # noqa: E402
from simplecil_reference import Images  # noqa: E402


def run_ours(stream: Any, model: nn.Module, **hp: Any):
    """Ours over the stream; returns the strategy, its initial head, every task's initial slices, per-session train
    batches, test sets and eval logits."""
    import ctta

    ours = ctta.strategies.create("coda_prompt", model, **{"seed": 0, **hp})
    head0 = [p.detach().clone() for p in ours.head]
    starts: Dict[int, Dict[str, Tensor]] = {}
    init = ours.init_task_slices

    def recorded(task: int) -> None:
        init(task)
        starts[task] = {f"{k}{layer}": ours.slices(k, layer)[task].detach().clone()
                        for layer in ours.layers for k in ("p", "k", "a")}

    ours.init_task_slices = recorded
    starts[0] = {f"{k}{layer}": ours.slices(k, layer)[0].detach().clone()
                 for layer in ours.layers for k in ("p", "k", "a")}
    train, test, out = [], [], []
    for seg in stream.segments:
        ours.segment_start(seg)
        x, y, _ = seg.materialise(torch.device("cpu"))
        bs = seg.batch_size
        if seg.kind == "train":
            train.append([(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)])
            for xb, yb in train[-1]:
                ours.learn(xb, yb)
        else:
            test.append((x, y))
            out.append(torch.cat([ours.predict(x[i:i + bs]) for i in range(0, len(x), bs)]))
        ours.segment_end(seg)
    return ours, head0, starts, train, test, out


class _TorchOnCPU:
    """``torch`` for the reference's ViT module with ``zeros`` returning a copy: its ``torch.zeros((1,),
    requires_grad=True).to(device=x.device)`` is a copy (a non-leaf) on a GPU but the leaf itself on the CPU, where its
    ``prompt_loss += loss`` then fails; everything else is torch's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*args: Any, **kwargs: Any) -> Tensor:
        return torch.zeros(*args, **kwargs).clone()


def run_reference(args: argparse.Namespace, stream: Any, ours: Any, head0: List[Tensor],
                  starts: Dict[int, Dict[str, Tensor]], train, test, hp: Dict[str, Any]):
    """The reference's learner over the same sessions; returns its eval logits (over seen classes) per session,
    the class order and the largest drift of earlier tasks' slices during later tasks."""
    sys.path.insert(0, os.path.abspath(args.reference))
    import timm.layers.weight_init

    sys.modules.setdefault("timm.models.layers.weight_init", timm.layers.weight_init)  # moved in timm 1.0
    import utils.inc_net as inc  # noqa: E402  (the reference's)
    from backbone import vit_coda_promtpt  # noqa: E402
    from backbone.prompt import CodaPrompt  # noqa: E402

    width = VIT["embed_dim"]
    state = {k: v for k, v in make_model(args.vit).net.state_dict().items() if not k.startswith("head.")}

    def backbone(a, pretrained=False):
        vit = vit_coda_promtpt.VisionTransformer(img_size=VIT["img_size"], patch_size=VIT["patch_size"],
                                                 embed_dim=width, depth=VIT["depth"], num_heads=VIT["num_heads"])
        vit.load_state_dict(state, strict=True)
        return vit

    inc.get_backbone = backbone
    vit_coda_promtpt.torch = _TorchOnCPU()
    import models.coda_prompt as coda  # noqa: E402

    coda.num_workers = 0
    order = list(stream.spec["class_order"])
    sessions = stream.spec["sessions"]
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    epochs = int(stream.spec["epochs"])
    prompt_param = [hp["pool_size"], hp["prompt_length"], hp["ortho_mu"]]
    config = {"memory_size": 0, "device": [torch.device("cpu")], "batch_size": int(stream.spec["batch_size"]),
              "init_lr": hp["lr"], "weight_decay": hp["weight_decay"], "min_lr": 1e-5, "optimizer": "adam",
              "scheduler": "cosine" if hp["cosine"] else "constant", "tuned_epoch": epochs,
              "nb_classes": len(order), "nb_tasks": len(sessions), "prompt_param": prompt_param,
              "backbone_type": "vit_base_patch16_224_coda_prompt", "model_name": "coda_prompt", "pretrained": False}
    torch.manual_seed(args.init_seed)  # its own draws (--inits own): head, uniform pools, Gram-Schmidt
    learner = coda.Learner(config)
    learner.topk = 1
    net = learner._network
    net.fc = nn.Linear(width, len(order))
    net.prompt = CodaPrompt(width, len(sessions), prompt_param, key_dim=width)
    layers = [l for l in net.prompt.e_layers if l < VIT["depth"]]
    assert layers == ours.layers, (layers, ours.layers)
    pt = hp["pool_size"] // len(sessions)
    if args.inits == "ours":
        with torch.no_grad():
            net.fc.weight.copy_(head0[0][order])
            net.fc.bias.copy_(head0[1][order])

    def copy_task(t: int) -> None:
        if args.inits == "own":
            return
        with torch.no_grad():
            for layer in layers:
                for k in ("p", "k", "a"):
                    getattr(net.prompt, f"e_{k}_{layer}")[t * pt:(t + 1) * pt].copy_(starts[t][f"{k}{layer}"])

    logits, ends = [], []
    for t, cls in enumerate(sessions):
        batches = train[t]
        per_epoch = len(batches) // epochs
        assert per_epoch * epochs == len(batches) and all(len(y) == len(batches[0][1]) for _, y in batches), \
            "epoch boundaries must fall on batch boundaries (2 x train_per_class divisible by the batch size)"
        norm = ours.model.normalize
        mapped = [[(norm(x), position[y]) for x, y in batches[e * per_epoch:(e + 1) * per_epoch]]
                  for e in range(epochs)]
        learner._cur_task += 1
        if learner._cur_task > 0:
            net.prompt.process_task_count()
        copy_task(t)
        learner._total_classes = learner._known_classes + len(cls)
        x, y = test[t]
        test_loader = DataLoader(Images(norm(x), position[y].numpy()), batch_size=256, shuffle=False)
        learner._train(EpochLoader(mapped), test_loader)
        net.eval()
        with torch.no_grad():
            logits.append(torch.cat([net(xb)[:, :learner._total_classes] for _, xb, _ in test_loader]))
        y_pred, _ = learner._eval_cnn(test_loader)
        assert np.array_equal(y_pred[:, 0], logits[-1].argmax(1).numpy())
        ends.append({f"{k}{layer}": getattr(net.prompt, f"e_{k}_{layer}")[t * pt:(t + 1) * pt].detach().clone()
                     for layer in layers for k in ("p", "k", "a")})
        learner.after_task()
    drift = max(float((getattr(net.prompt, f"e_{n[0]}_{n[1:]}")[t * pt:(t + 1) * pt].detach() - v).abs().max())
                for t, end in enumerate(ends) for n, v in end.items())  # a task's slices after later tasks
    return logits, torch.tensor(order), drift


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="folder with the reference's models/, utils/, backbone/")
    ap.add_argument("--vit", required=True, help="benchmarks/pretrain_vit.py's checkpoint")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train-per-class", type=int, default=192)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1, help="the stream's seed (class order, subsets, batches)")
    ap.add_argument("--inits", choices=["ours", "own"], default="ours",
                    help="ours: its head and each task's components start as ours; own: its own draws")
    ap.add_argument("--init-seed", type=int, default=0, help="--inits own: torch.manual_seed before its learner")
    ap.add_argument("--set", action="append", default=[], help="ours' hyperparameter KEY=JSON (both sides)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta
    from ctta.config import strategy_defaults

    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the reference's CosineSchedule divides by epochs - 1)")
    hp = dict(strategy_defaults("coda_prompt"))
    for kv in args.set:
        k, v = kv.split("=", 1)
        hp[k] = json.loads(v)
    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed, epochs=args.epochs,
                                 batch_size=args.batch_size, train_per_class=args.train_per_class,
                                 test_per_class=args.test_per_class or None)
    hp["num_tasks"] = len(stream.spec["sessions"])
    t0 = time.time()
    ours, head0, starts, train, test, out = run_ours(stream, make_model(args.vit), **hp)
    t1 = time.time()
    ref, order, ref_drift = run_reference(args, stream, ours, head0, starts, train, test, hp)
    t2 = time.time()
    print(f"cifar10_ci, class order {order.tolist()}, {sum(len(y) for s in train for _, y in s)} training samples "
          f"(epochs {args.epochs}, batch {args.batch_size}), stream seed {args.seed}, inits {args.inits} "
          f"(init seed {args.init_seed}), hparams {hp}; "
          f"ours {t1 - t0:.0f} s, reference {t2 - t1:.0f} s")
    print("| after session | test images | ours accuracy % | reference accuracy % | identical argmax % | "
          "max abs(logit difference) |")
    print("| --- | --- | --- | --- | --- | --- |")
    acc_o, acc_r, rows = [], [], []
    for t, ((x, y), o, r) in enumerate(zip(test, out, ref)):
        a_o, a_r, same, diff = compare_session(y, o, r, order)
        acc_o.append(a_o)
        acc_r.append(a_r)
        rows.append({"session": t, "ours": acc_o[-1], "reference": acc_r[-1], "identical": same, "max_diff": diff})
        print(f"| {t} | {len(y)} | {acc_o[-1]:.2f} | {acc_r[-1]:.2f} | {same:.2f} | {diff:.1e} |")
    avg = (sum(acc_o) / len(acc_o), sum(acc_r) / len(acc_r))
    print(f"average incremental accuracy: ours {avg[0]:.2f}, reference {avg[1]:.2f}; last accuracy: ours "
          f"{acc_o[-1]:.2f}, reference {acc_r[-1]:.2f}")
    print(f"largest change of a finished task's components during later tasks: reference {ref_drift:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "hparams": hp, "rows": rows, "avg": avg, "last": (acc_o[-1], acc_r[-1]),
                       "reference_drift": ref_drift, "seconds": (t1 - t0, t2 - t1)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
