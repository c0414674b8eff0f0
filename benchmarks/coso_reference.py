"""Agreement of our ``coso`` strategy with the official CoSO (quinn-ch/CoSO ``models/coso.py``, ``coso/adamw.py``,
``coso/coso_projector.py``, ``utils/scheduler.py``): the same ViT, training batches, class order, epochs, test
images and hyperparameters (configs/strategies/coso.yaml = ``exps/coso_cifar.json`` but the epochs and batch size).

The reference is not part of this repository: give a folder holding its ``models/``, ``coso/`` and ``utils/`` with
``--reference``; this script contains none of its code. It builds the reference's ``Learner`` and, per session, does
what its ``incremental_train`` does (``_cur_task`` + 1, ``update_fc``, then its ``_train``: parameter groups, trainable
parameters, ``CoSOAdamW`` or the task-boundary reset, ``CosineSchedule`` and ``train_function``), replacing only what
ties it to its data, hardware and logging:

- ``utils.inc_net.get_backbone``: our ViT up to its pooled features (``forward_features``, ``out_dim`` its width);
  the reference's per-task heads (``classifier_pool``, ``nn.Linear(out_dim, 2)``) start from our head's initial rows
  of the session's classes (``--heads ours``, the default: one start for both) or keep their own default init drawn
  under ``torch.manual_seed(--head-seed)`` (``--heads own``; default the stream seed);
- the data manager and loaders: its ``train_loader`` yields our train segment's batches, epoch by epoch (labels as
  positions in our class order, as its data manager relabels), the test images are our eval segment's;
- ``wandb`` (a stand-in module without a run: its logging is skipped) and ``transformers``' ``require_version``.

Ours runs through ``ctta.strategies.create("coso", model)`` on the ``cifar10_ci`` stream, driven segment by segment as
the engine does (``segment_start`` / ``learn`` / ``predict`` / ``segment_end``). The epoch boundaries must fall on
batch boundaries (2 x train_per_class divisible by the batch size), as the reference's per-epoch loader has them.

    OMP_NUM_THREADS=1 python benchmarks/coso_reference.py --reference /tmp/coso_ref --vit /tmp/vit_cifar_small.pt \\
        --data-root ../shared/data/cifar10 --train-per-class 192 --test-per-class 100 --epochs 3 --seed 1

Prints per session our accuracy and the reference's on the seen classes, the share of identical argmaxes and the
largest |logit difference|, then average incremental and last accuracy. ``--trace`` also compares the first
session step by step (loss, the projected gradient P^T G of each target weight, the sketch's singular values).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import compare_session  # noqa: E402

VIT = dict(img_size=32, patch_size=8, depth=4, embed_dim=128, num_heads=4)


class Feats(nn.Module):
    """The reference's backbone: images -> our ViT's pooled features (``out_dim`` wide)."""

    def __init__(self, clf: nn.Module) -> None:
        super().__init__()
        self.clf = clf
        self.out_dim = clf.feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.clf.forward_features(x)


class EpochLoader:
    """A train loader that yields the next epoch's batches (``(index, images, labels)``) each time it is iterated."""

    def __init__(self, epochs: List[List[Tuple[Tensor, Tensor]]]) -> None:
        self.epochs, self.done = epochs, 0

    def __len__(self) -> int:
        return len(self.epochs[0])

    def __iter__(self):
        batches = self.epochs[self.done]
        self.done += 1
        return iter([(None, x, y) for x, y in batches])


def make_model(vit: str) -> nn.Module:
    """Our small ViT (benchmarks/pretrain_vit.py's shape) with ``vit``'s weights, 10 outputs."""
    from ctta.backbones import create

    with torch.random.fork_rng():  # the same (random-init: seed 0) ViT each time; the global generator untouched
        torch.manual_seed(0)
        return create("vit_tiny_patch16_224", num_classes=10, weights=vit or None, **VIT)


def run_ours(stream: Any, model: nn.Module, trace: bool, train_ours: bool = True, **hp: Any):
    """Ours over the stream; returns the strategy, its initial head, per-session train batches, test sets,
    predictions (None without ``train_ours``: the batches only) and (``trace``) the first session's steps."""
    import ctta

    ours = ctta.strategies.create("coso", model, **{"seed": 0, **hp})
    head0 = {n: p.detach().clone() for n, p in zip(ours.head_names, ours.head)}
    train, test, out, steps = [], [], [], []
    if trace:
        step = ours.optimizer.step

        def traced() -> None:  # after the optimiser's step, the gradient is still there (zeroed after it)
            step()
            if ours.sessions.session == 0:
                st = [ours.optimizer.state[p] for p in ours.targets]
                steps.append({"proj_grad": [s["proj"].T @ p.grad for s, p in zip(st, ours.targets)],
                              "sigma": [s["fd_sigma"].clone() for s in st],
                              "weights": [p.detach().clone() for p in ours.targets]})

        ours.optimizer.step = traced
    for seg in stream.segments:
        ours.segment_start(seg)
        x, y, _ = seg.materialise(torch.device("cpu"))
        bs = seg.batch_size
        if seg.kind == "train":
            train.append([(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)])
            classes = list(seg.meta["classes"])
            for xb, yb in train[-1] if train_ours else []:
                if trace and ours.sessions.session <= 0:
                    with torch.no_grad():  # the session's cross-entropy (classes in class order, as its heads)
                        loss = F.cross_entropy(ours.model(xb)[:, classes] / ours.temperature, _pos(yb, classes))
                ours.learn(xb, yb)
                if trace and ours.sessions.session == 0:
                    steps[-1]["loss"] = float(loss)
        else:
            test.append((x, y))
            if train_ours:
                out.append(torch.cat([ours.predict(x[i:i + bs]) for i in range(0, len(x), bs)]))
        ours.segment_end(seg)
    return ours, head0, train, test, out, steps


def _pos(y: Tensor, classes: List[int]) -> Tensor:
    """Positions of the labels ``y`` in ``classes``."""
    return (y[:, None] == torch.tensor(classes)[None]).long().argmax(1)


def run_reference(args: argparse.Namespace, stream: Any, head0: Dict[str, Tensor], train, test, hp: Dict[str, Any]):
    """The reference's learner over the same sessions; returns its eval logits (over seen classes) per session,
    the class order and (``--trace``) the first session's steps."""
    sys.path.insert(0, os.path.abspath(args.reference))
    sys.modules["wandb"] = types.SimpleNamespace(run=None, log=lambda *a, **k: None)
    for name in ("transformers", "transformers.utils", "transformers.utils.versions"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["transformers.utils.versions"].require_version = lambda *a, **k: None
    import utils.inc_net as inc  # noqa: E402  (the reference's)

    inc.get_backbone = lambda a, pretrained=False: Feats(make_model(args.vit))
    import coso.adamw as adamw  # noqa: E402
    import models.coso as coso  # noqa: E402

    order = list(stream.spec["class_order"])
    sessions = stream.spec["sessions"]
    position = torch.full((max(order) + 1,), -1, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    epochs = int(stream.spec["epochs"])
    config = {"init_cls": len(sessions[0]), "increment": len(sessions[-1]), "total_sessions": len(sessions),
              "embd_dim": VIT["embed_dim"], "backbone_type": "ours", "device": [torch.device("cpu")],
              "epochs": epochs, "batch_size": int(stream.spec["batch_size"]), "lrate": hp["lr"],
              "fc_lrate": hp["fc_lr"], "weight_decay": hp["weight_decay"], "temperature": hp["temperature"],
              "proj_rank": hp["proj_rank"], "rank": hp["sketch_rank"], "db_decay": hp["sketch_decay"],
              "threshold": hp["threshold"], "update_gap": hp["update_gap"]}
    torch.manual_seed(args.seed if args.head_seed is None else args.head_seed)  # its heads' draws (--heads own)
    learner = coso.Learner(config)
    net = learner._network
    if args.heads == "ours":
        w, b = head0["net.head.weight"], head0["net.head.bias"]
        with torch.no_grad():
            for t, cls in enumerate(sessions):
                net.classifier_pool[t].weight.copy_(w[cls])
                net.classifier_pool[t].bias.copy_(b[cls])
    steps: List[Dict[str, Any]] = []
    if args.trace:  # wrap its optimiser's step and its network's forward; nothing of its logic changes
        step, forward, targets = adamw.CoSOAdamW.step, net.forward, []

        def fwd(x):
            out = forward(x)
            if net.training and learner._cur_task == 0:
                y = targets.pop(0)
                steps.append({"loss": float(F.cross_entropy(out["logits"].detach() / config["temperature"], y))})
            return out

        def traced(self, closure=None):
            r = step(self, closure)
            if learner._cur_task == 0:
                ps = self.param_groups[1]["params"]
                pr = [self.state[p]["projector"] for p in ps]
                steps[-1].update(proj_grad=[q.fd_project_matrix.T @ p.grad for q, p in zip(pr, ps)],
                                 sigma=[q.dbsvd.get_sketch_sigma().clone() for q in pr],
                                 weights=[p.detach().clone() for p in ps])
            return r

        net.forward, adamw.CoSOAdamW.step = fwd, traced
    logits = []
    for t, cls in enumerate(sessions):
        batches = train[t]
        per_epoch = len(batches) // epochs
        assert per_epoch * epochs == len(batches) and all(len(y) == len(batches[0][1]) for _, y in batches), \
            "epoch boundaries must fall on batch boundaries (2 x train_per_class divisible by the batch size)"
        mapped = [[(x, position[y]) for x, y in batches[e * per_epoch:(e + 1) * per_epoch]] for e in range(epochs)]
        if args.trace and t == 0:
            targets.extend(y for e in mapped for _, y in e)
        learner._cur_task += 1
        learner._total_classes = learner._known_classes + len(cls)
        net.update_fc(learner._total_classes)
        learner._train(EpochLoader(mapped), None)
        net.eval()
        x = test[t][0]
        with torch.no_grad():
            logits.append(torch.cat([net(x[i:i + 256])["logits"] for i in range(0, len(x), 256)]))
        learner.after_task()
    return logits, torch.tensor(order), steps


def optimizer_check(args: argparse.Namespace, hp: Dict[str, Any], tasks: int = 3, steps: int = 20) -> None:
    """Both optimisers fed the same seeded gradient stream (no feedback from the weights): a 128 x 128 subspace
    weight whose gradients live mostly in a task-specific 24-d output subspace, and a plain 10 x 128 weight, over
    ``tasks`` tasks of ``steps`` steps; the reference's task boundary is its ``Learner._reset_optimizer_state_for_
    new_task`` on a stand-in learner. Prints the largest weight difference after each task and the distance of
    the historical projectors H H^T."""
    sys.path.insert(0, os.path.abspath(args.reference))
    sys.modules.setdefault("wandb", types.SimpleNamespace(run=None, log=lambda *a, **k: None))
    for name in ("transformers", "transformers.utils", "transformers.utils.versions"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["transformers.utils.versions"].require_version = lambda *a, **k: None
    import coso.adamw as adamw  # noqa: E402  (the reference's)
    import models.coso as coso  # noqa: E402
    from ctta.strategies.common.subspace import SubspaceAdamW

    g = torch.Generator().manual_seed(0)
    w0, h0 = torch.randn(128, 128, generator=g) * 0.05, torch.randn(10, 128, generator=g) * 0.05
    ow, oh = nn.Parameter(w0.clone()), nn.Parameter(h0.clone())
    rw, rh = nn.Parameter(w0.clone()), nn.Parameter(h0.clone())
    ours = SubspaceAdamW([{"params": [oh], "lr": hp["fc_lr"]},
                          {"params": [ow], "lr": hp["lr"], "subspace": True}], weight_decay=hp["weight_decay"],
                         proj_rank=hp["proj_rank"], sketch_rank=hp["sketch_rank"], sketch_decay=hp["sketch_decay"],
                         update_gap=hp["update_gap"], shrink_block=hp["sketch_shrink_block"],
                         orthonormalize=hp["orthonormal_history"])
    ref = adamw.CoSOAdamW([{"params": [rh], "lr": hp["fc_lr"]},
                           {"params": [rw], "lr": hp["lr"], "proj_rank": hp["proj_rank"], "rank": hp["sketch_rank"],
                            "db_decay": hp["sketch_decay"], "update_proj_gap": hp["update_gap"]}],
                          weight_decay=hp["weight_decay"], betas=(0.9, 0.999), no_deprecation_warning=True)
    stub = types.SimpleNamespace(optimizer=ref, args={"lrate": hp["lr"], "fc_lrate": hp["fc_lr"],
                                                      "threshold": hp["threshold"]}, _cur_task=0)
    print("| task | max abs(W diff) | max abs(head diff) | max abs(W change) | H columns ours / reference | "
          "max abs(H H^T diff) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for t in range(tasks):
        if t:
            ours.end_task(hp["threshold"], hp["energy_rule"])
            stub._cur_task = t
            coso.Learner._reset_optimizer_state_for_new_task(stub)
            ours.reset_group_state([0])
            ref.state.pop(rh, None)  # the reference's next task trains a new head (fresh Adam state)
        basis = torch.linalg.qr(torch.randn(128, 24, generator=g))[0]
        for _ in range(steps):
            gw = basis @ torch.randn(24, 128, generator=g) + 0.01 * torch.randn(128, 128, generator=g)
            gh = torch.randn(10, 128, generator=g)
            for p, q in ((ow, rw), (oh, rh)):
                p.grad, q.grad = (gw if p is ow else gh).clone(), (gw if p is ow else gh).clone()
            ours.step()
            ref.step()
        ho = ours.historical_basis(ow)
        hr = ref.state[rw]["projector"].full_former_task_proj
        hd = "-" if ho is None or hr is None else f"{float((ho @ ho.T - hr @ hr.T).abs().max()):.1e}"
        print(f"| {t} | {float((ow - rw).abs().max()):.1e} | {float((oh - rh).abs().max()):.1e} | "
              f"{float((ow - w0).abs().max()):.1e} | {0 if ho is None else ho.shape[1]} / "
              f"{0 if hr is None else hr.shape[1]} | {hd} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="folder with the reference's models/, coso/, utils/")
    ap.add_argument("--vit", required=True, help="benchmarks/pretrain_vit.py's checkpoint ('' : random init)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train-per-class", type=int, default=192)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1, help="the stream's seed (class order, subsets, batches)")
    ap.add_argument("--heads", choices=["ours", "own"], default="ours")
    ap.add_argument("--head-seed", type=int, help="--heads own: torch.manual_seed before its learner (default --seed)")
    ap.add_argument("--reference-only", action="store_true", help="run the reference only (ours gives the batches)")
    ap.add_argument("--set", action="append", default=[], help="ours' hyperparameter KEY=JSON (both sides)")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--optimizer-check", action="store_true", help="only compare the optimisers on fixed gradients")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta
    from ctta.config import strategy_defaults

    hp = dict(strategy_defaults("coso"))
    for kv in args.set:
        k, v = kv.split("=", 1)
        hp[k] = json.loads(v)
    if args.optimizer_check:
        optimizer_check(args, hp)
        return 0
    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed, epochs=args.epochs,
                                 batch_size=args.batch_size, train_per_class=args.train_per_class,
                                 test_per_class=args.test_per_class or None)
    t0 = time.time()
    ours_hp = {k: v for k, v in hp.items() if k != "targets"}
    ours, head0, train, test, out, our_steps = run_ours(stream, make_model(args.vit), args.trace,
                                                        not args.reference_only, **ours_hp)
    t1 = time.time()
    ref, order, ref_steps = run_reference(args, stream, head0, train, test, hp)
    t2 = time.time()
    print(f"cifar10_ci, class order {order.tolist()}, {sum(len(y) for s in train for _, y in s)} training samples "
          f"(epochs {args.epochs}, batch {args.batch_size}), stream seed {args.seed}, heads {args.heads}; "
          f"ours {t1 - t0:.0f} s, reference {t2 - t1:.0f} s")
    print("| after session | test images | ours accuracy % | reference accuracy % | identical argmax % | "
          "max abs(logit difference) |")
    print("| --- | --- | --- | --- | --- | --- |")
    acc_o, acc_r, rows = [], [], []
    if args.reference_only:
        accs = [100 * float((order[:r.shape[1]][r.argmax(1)] == y).float().mean()) for (_, y), r in zip(test, ref)]
        print(f"reference only: accuracy per session {[round(a, 2) for a in accs]}; average incremental accuracy "
              f"{sum(accs) / len(accs):.2f}, last accuracy {accs[-1]:.2f}")
        return 0
    for t, ((x, y), o, r) in enumerate(zip(test, out, ref)):
        a_o, a_r, same, diff = compare_session(y, o, r, order)
        acc_o.append(a_o)
        acc_r.append(a_r)
        rows.append({"session": t, "ours": acc_o[-1], "reference": acc_r[-1], "identical": same, "max_diff": diff})
        print(f"| {t} | {len(y)} | {acc_o[-1]:.2f} | {acc_r[-1]:.2f} | {same:.2f} | {diff:.1e} |")
    avg = (sum(acc_o) / len(acc_o), sum(acc_r) / len(acc_r))
    print(f"average incremental accuracy: ours {avg[0]:.2f}, reference {avg[1]:.2f}; last accuracy: ours "
          f"{acc_o[-1]:.2f}, reference {acc_r[-1]:.2f}")
    if args.trace:
        _print_trace(our_steps, ref_steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "avg": avg, "last": (acc_o[-1], acc_r[-1])}, f, indent=1)
    return 0


def _print_trace(ours: List[Dict[str, Any]], ref: List[Dict[str, Any]]) -> None:
    """First session, step by step: the losses, the largest |P^T G difference| over the target weights (each row
    sign-aligned: an SVD direction's sign is arbitrary) and the largest |sketch sigma difference|."""
    print("| step | loss ours | loss reference | max abs(P^T G diff) | max abs(P^T G) | max abs(sigma diff) | "
          "max abs(W diff) after the step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, (o, r) in enumerate(zip(ours, ref)):
        pd = max(float((po - pr * torch.sign((po * pr).sum(1, keepdim=True))).abs().max())
                 for po, pr in zip(o["proj_grad"], r["proj_grad"]))
        pm = max(float(po.abs().max()) for po in o["proj_grad"])
        sd = max(float((so - sr).abs().max()) for so, sr in zip(o["sigma"], r["sigma"]))
        wd = max(float((wo - wr).abs().max()) for wo, wr in zip(o["weights"], r["weights"]))
        print(f"| {i} | {o['loss']:.7f} | {r['loss']:.7f} | {pd:.1e} | {pm:.1e} | {sd:.1e} | {wd:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
