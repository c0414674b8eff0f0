"""Agreement of our ``lae`` strategy with the official LAE (gqk/LAE ``main.py`` ``MyModule`` on ``libml``): the same
ViT weights, training batches, class order, epochs, test images and hyperparameters (config/vit_adapter.yaml over
config/base/cifar100_order1.yaml, as configs/strategies/lae.yaml cites).

The reference is not part of this repository: give its checkout with ``--reference``; this script contains none of
its code. It imports the reference's ``MyModule`` and, per task, does what its ``Trainer.run`` / ``setup_task`` do
(``module.setup()``: the per-task head ``DynamicSimpleHead.append``, PET creation / the ``ModelEmaV2`` offline expert,
``configure_optimizer``; then ``module.run("train")``: its epochs, ``pre_train_epoch`` freeze / unfreeze,
``train_step``, ``post_train_step`` EMA update and ``eval_epoch``), replacing only what ties it to its data, hardware,
logging and pinned package versions:

- the backbone: the reference's own ``VisionTransformer`` (``libml/model/backbone/vit.py``, timm 0.5.4's with its
  PET hooks) built at our small ViT's size and loaded with our checkpoint's weights (checked: its class-token
  features equal our timm ViT's); our Classifier's input normalisation is applied to the images it is given;
- the data module: a stand-in whose train loader yields our train segment's batches, epoch by epoch (labels as
  positions in our class order, as its continuum scenario relabels), and whose val loader gives our eval segment's
  test images; the Fabric trainer: a stand-in (CPU, fp32, no checkpoints or TensorBoard);
- stand-in modules for packages missing offline or changed since its pins (lightning, continuum, omegaconf,
  torchinfo; torchmetrics' ``Accuracy()``: top-1 of the argmax), Python 3.11's refusal of dataclass-instance
  defaults (turned into ``default_factory``), and timm 1.0's moved ``timm.models.layers.helpers`` /
  ``_init_vit_weights`` / ``overlay_external_default_cfg`` (the last two used by its Swin only); its own
  ``TORCH_FLOAT32_MATMUL_PRECISION`` knob set to ``highest`` (its default ``medium`` means TF32 on its GPUs and bf16
  matmuls on a CPU: a speed setting, not part of the method); ``Scaler.extra_repr`` (logging only: its ``:.4f`` of a
  Parameter fails under torch 2);
- ``--init ours`` (default): its PETs and each task's new classifier start from our strategy's initial values (one
  start for both); ``--init own``: they keep the reference's own initialisation under ``seed_everything``.
- ``adapt_blocks`` [0, 1, 2, 3] (our ViT has 4 blocks; the config's [0..4] needs 5), ``eval_every_n_epoch`` =
  ``num_epochs`` (evaluation only after each task; training is unchanged), ``summary_depth`` -1.

Ours runs through ``ctta.strategies.create("lae", model)`` on the ``cifar10_ci`` stream, driven segment by segment as
the engine does (``segment_start`` / ``learn`` / ``predict`` / ``segment_end``). Epoch boundaries must fall on batch
boundaries (2 x train_per_class divisible by the batch size), as the reference's per-epoch loader has them.

    OMP_NUM_THREADS=1 python benchmarks/lae_reference.py --reference /tmp/lae_ref --vit /tmp/vit_cifar_small.pt \\
        --data-root ../shared/data/cifar10 --train-per-class 1000 --test-per-class 500 --epochs 5 --batch-size 25 \\
        --seed 1

Prints per task the online, offline and ensemble accuracy of both on the seen classes, identical argmaxes, the largest
|difference| of the online logits and of the training losses, then average incremental and last accuracy.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
import types
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VIT = dict(img_size=32, patch_size=8, depth=4, embed_dim=128, num_heads=4)

# Stand-in modules (ours, not the reference's): the imports libml needs, with the behaviour the run uses.
STAND_INS = {
    "omegaconf/__init__.py": """
class DictConfig(dict):
    pass
class ListConfig(list):
    pass
class OmegaConf:
    @staticmethod
    def create(obj=None):
        return obj
    @staticmethod
    def to_container(obj, **_):
        return obj
    @staticmethod
    def save(*_, **__):
        pass
""",
    "continuum/__init__.py": "class ClassIncremental:\n    pass\n",
    "continuum/datasets/__init__.py": """
class _ContinuumDataset:
    pass
class ImageFolderDataset(_ContinuumDataset):
    pass
CIFAR100 = ImageNet100 = DomainNet = SVHN = MNIST = CIFAR10 = FashionMNIST = _ContinuumDataset
""",
    "continuum/datasets/base.py": "from . import _ContinuumDataset\n",
    "continuum/scenarios/__init__.py": "",
    "continuum/scenarios/base.py": "class _BaseScenario:\n    pass\n",
    "continuum/tasks.py": "class TaskType:\n    pass\n",
    "continuum/download.py": "def download(*a, **k):\n    raise RuntimeError('offline')\nuntar = unzip = download\n",
    "lightning/__init__.py": """
class Fabric:
    def __init__(self, *args, **kwargs):
        pass
""",
    "lightning/fabric/__init__.py": "",
    "lightning/fabric/strategies.py": "STRATEGY_REGISTRY = {}\n",
    "torchinfo/__init__.py": "def summary(*a, **k):\n    return ''\n",
    "torchmetrics/__init__.py": """
import torch
from torch import nn
class Accuracy(nn.Module):
    '''torchmetrics 0.10's Accuracy() on N x C scores: top-1 of the argmax, accumulated over updates.'''
    def __init__(self):
        super().__init__()
        self.correct, self.total = 0, 0
    def update(self, preds, target):
        self.correct += int((preds.argmax(1) == target).sum())
        self.total += int(target.numel())
    def compute(self):
        return torch.tensor(self.correct / max(self.total, 1))
    def reset(self):
        self.correct, self.total = 0, 0
""",
}


def write_stand_ins(folder: str) -> str:
    """Write the stand-in packages under ``folder``; returns it (to be put first on ``sys.path``)."""
    for rel, text in STAND_INS.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text.lstrip("\n"))
    return folder


def allow_instance_defaults() -> None:
    """Python >= 3.11 refuses a dataclass instance as a field default (the reference's configs use them, as Python
    3.8 allowed): such a default becomes ``default_factory`` of a copy."""
    original = dataclasses._process_class

    def process(cls, *args, **kwargs):
        for name in list(getattr(cls, "__annotations__", {})):
            val = cls.__dict__.get(name, dataclasses.MISSING)
            if dataclasses.is_dataclass(val) and not isinstance(val, type):
                setattr(cls, name, dataclasses.field(default_factory=lambda v=val: copy.deepcopy(v)))
        return original(cls, *args, **kwargs)

    dataclasses._process_class = process


def timm_shims() -> None:
    """timm 1.0 moved what the reference imports from timm 0.5.4's paths."""
    import timm.layers
    import timm.models.layers  # noqa: F401
    import timm.models.vision_transformer as tv

    helpers = types.ModuleType("timm.models.layers.helpers")
    helpers.to_2tuple = timm.layers.to_2tuple
    sys.modules["timm.models.layers.helpers"] = helpers
    if not hasattr(tv, "_init_vit_weights"):
        tv._init_vit_weights = tv.init_weights_vit_timm
    import timm.models.helpers as th

    if not hasattr(th, "overlay_external_default_cfg"):  # used only by its Swin factories
        th.overlay_external_default_cfg = lambda *a, **k: None


class EpochLoader:
    """A train loader that yields the next epoch's batches (``(images, labels)``) each time it is iterated."""

    def __init__(self, epochs: List[List[Tuple[Tensor, Tensor]]]) -> None:
        self.epochs, self.next = epochs, 0

    def __len__(self) -> int:
        return len(self.epochs[0])

    def __iter__(self):
        batches = self.epochs[min(self.next, len(self.epochs) - 1)]
        self.next += 1
        return iter(batches)


class StandInTrainer:
    """What ``Module`` asks of its Fabric trainer, on the CPU in fp32 (no checkpoints, no launcher)."""

    global_rank = 0
    ckpt_dir = "."

    def setup(self, model, *optimizers):
        return (model, *optimizers)

    def setup_dataloaders(self, loader):
        return loader

    def backward(self, loss, *_, **__):
        loss.backward()

    def autocast(self):
        return contextlib.nullcontext()

    def to_device(self, obj):
        return obj

    def no_backward_sync(self, *_, **__):
        return contextlib.nullcontext()

    def save_checkpoint(self):
        pass


class NullWriter:
    """Its TensorBoard writer, writing nothing."""

    def write_scalars(self, *_, **__):
        pass


def session_data(stream, position: Tensor, batch_size: int, epochs: int, norm: nn.Module):
    """Per task: the reference's epochs of normalised train batches and its test batches (x, label position, task)."""
    train, test, raw_test = [], [], []
    task_of = torch.full_like(position, -1)
    for t, classes in enumerate(stream.spec["sessions"]):
        task_of[torch.tensor(classes)] = t
    for seg in stream.segments:
        x, y, _ = seg.materialise(torch.device("cpu"))
        with torch.no_grad():
            xn = torch.cat([norm(x[i:i + 500]) for i in range(0, len(x), 500)])
        if seg.kind == "train":
            per_epoch = len(x) // epochs
            assert per_epoch * epochs == len(x) and per_epoch % batch_size == 0, \
                "epoch boundaries must fall on batch boundaries"
            train.append([[(xn[i:i + batch_size], position[y[i:i + batch_size]])
                           for i in range(e * per_epoch, (e + 1) * per_epoch, batch_size)] for e in range(epochs)])
        else:
            test.append([(xn[i:i + 500], position[y[i:i + 500]], task_of[y[i:i + 500]])
                         for i in range(0, len(x), 500)])
            raw_test.append((x, y))
    return train, test, raw_test


def run_ours(args, stream, make_model):
    """Our strategy over the stream; per session the (online, offline, ensemble) logits on its eval segment."""
    import ctta
    from ctta.strategies.common.incremental import mask_logits

    over = {"head_init": args.ours_head_init} if args.ours_head_init else {}
    torch.manual_seed(args.seed)  # the PET modules' initial draw (torch's global generator, as the engine seeds it)
    ours = ctta.strategies.create("lae", make_model(), seed=args.seed, num_epochs=args.epochs, **over)
    init = {"pets": [p.detach().clone() for p in ours.pets],
            "head": [p.detach().clone() for p in ours.head]}
    out, losses = [], []
    for seg in stream.segments:
        ours.segment_start(seg)
        x, y, _ = seg.materialise(torch.device("cpu"))
        if seg.kind == "train":
            keep = torch.zeros(10, dtype=torch.bool)
            keep[torch.tensor(seg.meta["classes"])] = True
            for i in range(0, len(x), seg.batch_size):
                logits = ours.learn(x[i:i + seg.batch_size], y[i:i + seg.batch_size])
                # the loss of that step: cross-entropy over the session's classes
                losses.append(float(F.cross_entropy(mask_logits(logits, keep), y[i:i + seg.batch_size])))
        else:
            with torch.no_grad():
                on = torch.cat([ours.mask(ours.model(x[i:i + 500])) for i in range(0, len(x), 500)])
                off = (torch.cat([ours.mask(ours._offline_logits(x[i:i + 500])) for i in range(0, len(x), 500)])
                       if ours.offline_ready else None)
            ens = torch.cat([ours.predict(x[i:i + seg.batch_size]) for i in range(0, len(x), seg.batch_size)])
            out.append((on, off, ens))
        ours.segment_end(seg)
    return out, init, losses


def import_reference(args) -> Any:
    """Import the reference's ``main`` with the stand-ins in place; returns the module."""
    stand = write_stand_ins(tempfile.mkdtemp(prefix="lae_stand_"))
    sys.path.insert(0, os.path.abspath(args.reference))
    sys.path.insert(0, stand)
    for name in [m for m in sys.modules if m == "torchmetrics" or m.startswith("torchmetrics.")]:
        del sys.modules[name]
    allow_instance_defaults()
    timm_shims()
    # its libml/core/abc.py sets this process-wide (default "medium": TF32 on its GPUs, bf16 matmuls on a CPU)
    os.environ["TORCH_FLOAT32_MATMUL_PRECISION"] = "highest"
    import main as ref_main  # noqa: E402  (the reference's main.py)
    from libml.model.misc.scaler import Scaler

    # its repr formats the scale Parameter with ":.4f", which torch >= 2 refuses for a tensor that requires grad
    Scaler.extra_repr = lambda self: f"scale={float(self.scale):.4f}"
    from absl import flags

    flags.FLAGS(["lae_reference"])  # defaults: debug False
    return ref_main


def run_reference(args, stream, make_model, init, train, test, position):
    """The reference's MyModule over the same tasks; per task the (online, offline, ensemble) logits on the test."""
    ref = import_reference(args)
    import libml.core.abc as abc
    from libml.model import ModelConf
    from libml.model.backbone import vit
    from libml.optim import OptimizerConf, SchedulerConf

    clf = make_model()
    state = {k: v for k, v in clf.net.state_dict().items() if not k.startswith("head.")}

    def vit_ours(**_):
        net = vit.VisionTransformer(qkv_bias=True, **VIT)
        net.load_state_dict(state, strict=True)
        return net

    vit.vit_ours = vit_ours
    # its backbone's class-token features must be our ViT's
    probe = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        a = vit_ours()(clf.normalize(probe))[:, 0]
        b = clf.forward_features(probe)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())

    sessions = stream.spec["sessions"]
    order = torch.tensor(stream.spec["class_order"])

    class DM(abc.DataModuleABC):
        """The data module: our stream's sessions, labels as class-order positions."""

        start_task, num_tasks, memory = 0, len(sessions), None
        scenario_train = types.SimpleNamespace(increments=[len(s) for s in sessions], nb_tasks=len(sessions))

        def train_dataloader(self, **_):
            return EpochLoader(train[self.current_task])

        def val_dataloader(self):
            return test[self.current_task]

    cfg = ref.MyModuleConf(
        num_epochs=args.epochs, model=ModelConf(backbone="vit_ours"),
        optimizer=OptimizerConf(algo="Adam", lr=0.0028125, weight_decay=0.0), scheduler=SchedulerConf(),
        schedule_unit="none", eval_every_n_epoch=args.epochs, summary_depth=-1,
        adapt_blocks=[0, 1, 2, 3], pet_cls="Adapter", pet_kwargs={"down_sample": 5, "mode": "parallel", "scale": None},
        num_emas=1, ema_decay=0.9999, num_freeze_epochs=3, eval_only_emas=False)
    torch.manual_seed(args.seed)  # its Trainer.run: seed_everything
    dm = DM()
    module = ref.MyModule(cfg)
    module.datamodule, module.trainer, module.device, module.logger = dm, StandInTrainer(), torch.device("cpu"), \
        NullWriter()
    losses, accs = [], []
    train_step = module.train_step

    def traced_step(batch, batch_idx):
        loss, d = train_step(batch, batch_idx)
        losses.append(float(loss))
        return loss, d

    module.train_step = traced_step
    results, out = [], []
    post = module.post_eval_epoch
    module.post_eval_epoch = lambda result: (results.append(result), post(result))[1]
    for dm.current_task in range(len(sessions)):
        module.setup()
        module.current_epoch, module.global_step = 0, 0
        if args.init == "ours":
            t = dm.current_task
            rows = order[sum(len(s) for s in sessions[:t]):sum(len(s) for s in sessions[:t + 1])]
            w, b = init["head"]
            with torch.no_grad():
                module.model.head.classifiers[t].weight.copy_(w[rows])
                module.model.head.classifiers[t].bias.copy_(b[rows])
                if t == 0:
                    ref_pets = [p for p in module.pets.parameters()]
                    assert len(ref_pets) == len(init["pets"])
                    for p, q in zip(ref_pets, init["pets"]):
                        p.copy_(q.view_as(p))
        module.run("train")
        accs.append(float(module.val_acc.compute()))
        module.eval()
        with torch.no_grad():
            on = torch.cat([module(x) for x, _, _ in test[dm.current_task]])
            off = None
            if len(module.pets_emas):
                module.attach_pets(module.pets_emas[0].module)
                off = torch.cat([module(x) for x, _, _ in test[dm.current_task]])
                module.attach_pets(module.pets)
        module.train()
        out.append((on, off, results[-1]))
    return out, losses, accs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="checkout of gqk/LAE (main.py, libml/)")
    ap.add_argument("--vit", required=True, help="benchmarks/pretrain_vit.py's checkpoint")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--init", choices=("ours", "own"), default="ours")
    ap.add_argument("--ours-head-init", default=None, help="override our head_init (reset | keep)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ctta

    def make_model():
        return ctta.backbones.create("vit_tiny_patch16_224", num_classes=10, weights=args.vit, **VIT).eval()

    stream = ctta.streams.create("cifar10_ci", data_root=args.data_root, seed=args.seed, epochs=args.epochs,
                                 batch_size=args.batch_size, train_per_class=args.train_per_class,
                                 test_per_class=args.test_per_class or None)
    order = torch.tensor(stream.spec["class_order"])
    position = torch.full((10,), -1, dtype=torch.long)
    position[order] = torch.arange(len(order))
    t0 = time.time()
    ours, init, our_losses = run_ours(args, stream, make_model)
    t1 = time.time()
    norm = make_model().normalize
    train, test, raw_test = session_data(stream, position, args.batch_size, args.epochs, norm)
    ref, ref_losses, ref_val = run_reference(args, stream, make_model, init, train, test, position)
    t2 = time.time()
    print(f"cifar10_ci, class order {order.tolist()}, seed {args.seed}, {args.train_per_class} train / "
          f"{args.test_per_class} test images per class, {args.epochs} epochs, batch {args.batch_size}, init "
          f"{args.init}; ours {t1 - t0:.0f} s, reference {t2 - t1:.0f} s")
    print("| task | test images | online ours / ref % | offline ours / ref % | ensemble ours / ref % | "
          "identical ensemble argmax % | max abs(online logit diff) | max abs(loss diff) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    per_task = len(our_losses) // len(ours)
    figs: Dict[str, List[float]] = {k: [] for k in ("on_ours", "on_ref", "off_ours", "off_ref", "ens_ours", "ens_ref")}
    for t, ((x, y), (o_on, o_off, o_ens), (r_on, r_off, r_res)) in enumerate(zip(raw_test, ours, ref)):
        seen = order[:r_on.shape[1]]

        def acc(pred: Tensor) -> float:
            return 100 * float((pred == y).float().mean())

        pred_on_ref, pred_ens_ref = seen[torch.cat(r_res[0])], seen[torch.cat(r_res[2])]
        assert torch.equal(pred_on_ref, seen[r_on.argmax(1)])
        a_on, r_on_acc = acc(o_on.argmax(1)), acc(pred_on_ref)
        a_off = acc(o_off.argmax(1)) if o_off is not None else float("nan")
        r_off_acc = acc(seen[r_off.argmax(1)]) if r_off is not None else float("nan")
        a_ens, r_ens_acc = acc(o_ens.argmax(1)), acc(pred_ens_ref)
        assert abs(r_ens_acc - 100 * ref_val[t]) < 1e-6  # its own val_acc
        same = 100 * float((o_ens.argmax(1) == pred_ens_ref).float().mean())
        dl = max(abs(a - b) for a, b in zip(our_losses[t * per_task:(t + 1) * per_task],
                                            ref_losses[t * per_task:(t + 1) * per_task]))
        print(f"| {t} | {len(y)} | {a_on:.2f} / {r_on_acc:.2f} | {a_off:.2f} / {r_off_acc:.2f} | "
              f"{a_ens:.2f} / {r_ens_acc:.2f} | {same:.2f} | {float((o_on[:, seen] - r_on).abs().max()):.1e} | "
              f"{dl:.1e} |")
        for k, v in (("on_ours", a_on), ("on_ref", r_on_acc), ("off_ours", a_off), ("off_ref", r_off_acc),
                     ("ens_ours", a_ens), ("ens_ref", r_ens_acc)):
            figs[k].append(v)
    print("| expert | avg incremental ours / ref % | last ours / ref % |")
    print("| --- | --- | --- |")
    for name, k in (("online", "on"), ("offline", "off"), ("ensemble", "ens")):
        o, r = figs[f"{k}_ours"], figs[f"{k}_ref"]
        vo = [v for v in o if v == v]
        vr = [v for v in r if v == v]
        print(f"| {name} | {sum(vo) / len(vo):.2f} / {sum(vr) / len(vr):.2f} | {o[-1]:.2f} / {r[-1]:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "figures": figs, "losses_ours": our_losses, "losses_ref": ref_losses}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
