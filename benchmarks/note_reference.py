"""NOTE against TTAB's (LINs-lab/ttab): same model, images, batches, order and memory draws.

The reference is not part of this repository: give ``--reference`` the folder that holds TTAB's ``ttab`` package
(e.g. ``git --git-dir=<mirror> archive 19cb3ce ttab | tar -x -C /tmp/ref_ttab``). Its ``ttab.model_adaptation.note``
is imported from there; the three data/model-loading modules its imports pull in (``ttab.loads.datasets.loaders``,
``ttab.loads.define_dataset``, ``ttab.loads.define_model``; they need an older torch) are stand-ins, unused by the
online path. The reference's ``NOTE`` object is set up as its ``__init__`` / ``initialize`` would (``_initialize_model``,
``_initialize_trainable_parameters``, ``_initialize_optimizer``, its ``FIFO``, ``PBRS`` and ``HLoss``) from the
configuration of ``ttab/configs/algorithms.py`` ``"note"`` and ``parameters.py``'s lr, then driven with its own
``adapt_and_eval`` per batch (``last_iterate`` model selection; the prediction is what it hands its metrics).
Its PBRS draws from Python's global ``random``, seeded with ``--seed`` before the run; ours from a ``random.Random``
seeded alike, with the same calls in the same order.

    python benchmarks/note_reference.py --reference /tmp/ref_ttab --weights ../shared/models/resnet20-12fca82f.th \\
        --data-root ../shared/data/cifar10 --num-samples 1000 --batch-size 64 --dirichlet 0.01

Prints per domain the errors of source, BN, ours and the reference, identical argmaxes and the largest |logit diff|.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import types
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import corruption_domains, model_factory, stream_arguments  # noqa: E402


def stub(name: str) -> types.ModuleType:
    """A stand-in module whose every public attribute is an empty class (type annotations read them)."""
    module = types.ModuleType(name)

    def missing(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {})

    module.__getattr__ = missing
    sys.modules[name] = module
    return module


class Recorder:
    """TTAB's ``Metrics`` / ``Logger`` / ``Timer`` / model selection, reduced to what the online path calls."""

    def __init__(self) -> None:
        self.yhat = None
        self.optimal_state = None

    # metrics
    def eval(self, y, yhat) -> None:
        self.yhat = yhat.detach()

    def eval_auxiliary_metric(self, *a, **k) -> None:
        return None

    # logger
    def log(self, *a, **k) -> None:
        return None

    # timer
    def __call__(self, *a, **k):
        import contextlib

        return contextlib.nullcontext()

    # last_iterate model selection (ttab/model_selection/last_iterate.py)
    def initialize(self) -> None:
        self.optimal_state = None

    def clean_up(self) -> None:
        self.optimal_state = None

    def save_state(self, state, current_batch) -> None:
        self.optimal_state = state

    def select_state(self):
        return self.optimal_state

    name = "last_iterate"


def reference_note(ref_root: str, model: nn.Module, lr: float, seed: int):
    """TTAB's NOTE around ``model``, configured as its defaults, without its data/model loaders."""
    sys.path.insert(0, ref_root)
    import ttab  # the real package (its __init__ imports nothing)

    loads = types.ModuleType("ttab.loads")
    loads.__path__ = [os.path.join(ref_root, "ttab", "loads")]  # its __init__ skipped; its model files load
    datasets = types.ModuleType("ttab.loads.datasets")
    datasets.__path__ = []
    sys.modules.update({"ttab.loads": loads, "ttab.loads.datasets": datasets})
    ttab.loads, loads.datasets = loads, datasets
    adaptation = types.ModuleType("ttab.model_adaptation")  # its __init__ imports every method; only note is needed
    adaptation.__path__ = [os.path.join(ref_root, "ttab", "model_adaptation")]
    sys.modules["ttab.model_adaptation"] = adaptation
    ttab.model_adaptation = adaptation
    for parent, leaf in ((datasets, "loaders"), (loads, "define_dataset"), (loads, "define_model")):
        setattr(parent, leaf, stub(f"{parent.__name__}.{leaf}"))
    from ttab.configs.algorithms import algorithm_defaults
    import ttab.model_adaptation.note as note

    conf = SimpleNamespace(**algorithm_defaults["note"])
    conf.lr, conf.device, conf.debug, conf.n_train_steps, conf.seed = lr, "cpu", False, 1, seed
    conf.model_selection_method, conf.record_preadapted_perf, conf.stochastic_restore_model = "last_iterate", False, False
    conf.base_data_name, conf.statistics, conf.threshold_note = "cifar10", {"n_classes": 10}, 1
    ref = note.NOTE.__new__(note.NOTE)
    ref._meta_conf, ref._base_model, ref.fishers, ref._oracle_model_selection = conf, model, None, False
    ref._model = ref._initialize_model(model)
    params, _ = ref._initialize_trainable_parameters()
    ref._optimizer = ref._initialize_optimizer(params)
    ref.fifo = note.FIFO(capacity=conf.update_every_x)
    ref.memory = ref.define_memory()
    ref.entropy_loss = note.adaptation_utils.HLoss(temp_factor=conf.temperature)
    return ref, conf


def note_step(ref, rec: Recorder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One online batch of TTAB's NOTE: its ``adapt_and_eval`` (non-episodic), and the prediction it hands its
    metrics (``rec`` stands in for metrics, model selection, logger and timer)."""
    from ttab.api import Batch

    ref.adapt_and_eval(episodic=False, metrics=rec, model_selection_method=rec, current_batch=Batch(x, y),
                       previous_batches=[], logger=rec, timer=rec)
    return rec.yhat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="the folder holding TTAB's ttab package")
    stream_arguments(ap, num_samples=1000, batch_size=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)

    import ctta

    domains = corruption_domains(args)
    make_model = model_factory(args)

    ours = ctta.strategies.create("note", make_model(), lr=args.lr, seed=args.seed)
    ref, conf = reference_note(args.reference, make_model(), args.lr, args.seed)

    source = make_model()
    bn = ctta.strategies.create("bn", make_model())
    rec = Recorder()
    random.seed(args.seed)  # the reference's PBRS draws from the global generator
    print(f"batch {args.batch_size}; reference conf {vars(conf)}")
    print("| domain | source | BN | NOTE ours | NOTE reference | identical argmax % | max \\|logit diff\\| | s ours / ref |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    b = args.batch_size
    tot = [0, 0, 0, 0, 0, 0]
    for name, x_all, y_all in domains:
        e = [0, 0, 0, 0]
        same, diff, t_o, t_r = 0, 0.0, 0.0, 0.0
        for i in range(0, len(y_all), b):
            x, y = x_all[i:i + b], y_all[i:i + b]
            t0 = time.time()
            o = ours.adapt(x)
            t1 = time.time()
            r = note_step(ref, rec, x, y)
            t_r, t_o = t_r + time.time() - t1, t_o + t1 - t0
            with torch.no_grad():
                preds = (source(x).argmax(1), bn.adapt(x).argmax(1), o.argmax(1), r.argmax(1))
            for j, p in enumerate(preds):
                e[j] += int((p != y).sum())
            same += int((preds[2] == preds[3]).sum())
            diff = max(diff, float((o - r).abs().max()))
        n = len(y_all)
        for j, v in enumerate((*e, same, n)):
            tot[j] += v
        print(f"| {name} | " + " | ".join(f"{100 * v / n:.2f}" for v in e) + f" | {100 * same / n:.2f} | {diff:.1e} | "
              f"{t_o:.0f} / {t_r:.0f} |", flush=True)
    n = tot[-1]
    print("| **mean** | " + " | ".join(f"{100 * v / n:.2f}" for v in tot[:4]) + f" | {100 * tot[4] / n:.2f} | | |")
    print(f"memory per class (ours / reference): {ours.memory.per_class()} / {ref.memory.get_occupancy_per_class()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
