"""Agreement of our T3A and online SHOT / SHOT-IM with the official code of T3A (matsuolab/T3A), which carries all
three as DomainBed test-time algorithms: same model, images, batches, order and hyperparameters.

The reference is not part of this repository: give ``--reference`` the file ``domainbed/adapt_algorithms.py`` of a
checkout of matsuolab/T3A (e.g. ``git --git-dir=<mirror> show ff8cde5:domainbed/adapt_algorithms.py > /tmp/t3a.py``).
It is imported from that path; the only module it needs from DomainBed, ``domainbed.algorithms.Algorithm`` (an
``nn.Module`` holding ``hparams``), is a stand-in defined here. This script contains none of its code.

Both sides see the shared ResNet-20 (each its own fresh copy), one continual CIFAR-10-C stream generated once by our
engine, the same batches in the same order and no reset between domains (the continual protocol; the official
script resets per test environment). The reference's ``T3A(..., algorithm)`` gets ``featurizer`` = our backbone's
penultimate features and ``classifier`` = its linear head, ``hparams = {"filter_K": K, "cached_loader": False}``, and
is called as ``t3a(x, adapt=True)`` per batch; ours is ``ctta.strategies.create("t3a", model, filter_k=K)``.
``SHOT`` / ``SHOTIM`` get the same ``algorithm`` with DomainBed's ``hparams`` ``{"lr": LR, "weight_decay": 0}`` and
``{"alpha": 1, "gamma": 1, "beta": 0.9, "theta": 0.1}`` (its script's grid for beta / theta; alpha scales lr); ours
is ``create("shot", model, bn="source", optimizer="adam", lr=LR, cls_par=0.1 or 0, threshold=0.9)`` (the
reference's featurizer is in eval mode during its adaptation forward: BatchNorm on the source statistics).

    python benchmarks/domainbed_tta_reference.py --reference /tmp/ref_t3a/adapt_algorithms.py \\
        --weights ../shared/models/resnet20-12fca82f.th --data-root ../shared/data/cifar10 --num-samples 1000 \\
        --methods t3a,shot,shotim --filter-k 100,20,1 --lr 1e-4

Prints per domain the error of both, the share of identical argmaxes and the largest |output difference|.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
from typing import Any, Dict, Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import corruption_domains, model_factory, stream_arguments  # noqa: E402


def import_reference(path: str):
    """The reference module from ``path``, with the stand-in ``domainbed.algorithms.Algorithm`` it subclasses."""

    class Algorithm(nn.Module):
        def __init__(self, input_shape, num_classes, num_domains, hparams) -> None:
            super().__init__()
            self.hparams = hparams

    pkg = types.ModuleType("domainbed")
    pkg.__path__ = []
    algorithms = types.ModuleType("domainbed.algorithms")
    algorithms.Algorithm = Algorithm
    sys.modules.setdefault("domainbed", pkg)
    sys.modules["domainbed.algorithms"] = algorithms
    spec = importlib.util.spec_from_file_location("t3a_reference_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Trained(nn.Module):
    """What the reference's ``T3A`` reads from a trained DomainBed algorithm: ``featurizer`` and ``classifier``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from ctta.backbones.classifier import last_linear

        self.classifier = last_linear(model)
        self.classifier.requires_grad_(False)
        self.hparams = {}

        self.featurizer = Featurizer(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.featurizer(x))


class Featurizer(nn.Module):
    """The penultimate features of ``model``; its parameters are the model's, the head frozen (DomainBed's
    featurizer holds no head: the reference's optimiser must not move it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def ours_arguments(method: str, filter_k: int, lr: float, theta: float, seed: int) -> Tuple[str, Dict[str, Any]]:
    """Our strategy and hyperparameters for the official ``method`` (t3a, shot, shotim): T3A with ``filter_k``;
    SHOT / SHOT-IM as the T3A repository's (BatchNorm on source statistics, Adam at ``lr``, ``theta`` for SHOT's
    pseudo-label term, 0 for SHOT-IM, confidence threshold 0.9)."""
    if method == "t3a":
        return "t3a", {"filter_k": filter_k}
    return "shot", {"bn": "source", "optimizer": "adam", "lr": lr, "cls_par": theta if method == "shot" else 0.0,
                    "threshold": 0.9, "seed": seed}


def official(ref, method: str, make_model, filter_k: int, lr: float, theta: float) -> nn.Module:
    """The official ``T3A`` / ``SHOT`` / ``SHOTIM`` of module ``ref`` around a fresh model from ``make_model``, with
    DomainBed's hparams (T3A: ``filter_K``; SHOT: lr, no weight decay, alpha 1, gamma 1, beta 0.9, ``theta``);
    called per batch as ``algorithm(x, adapt=True)``."""
    if method == "t3a":
        return ref.T3A((3, 32, 32), 10, 1, {"filter_K": filter_k, "cached_loader": False},
                       Trained(make_model().requires_grad_(False)))
    trained = Trained(make_model())
    trained.hparams = {"lr": lr, "weight_decay": 0.0}
    cls = ref.SHOT if method == "shot" else ref.SHOTIM
    return cls((3, 32, 32), 10, 1, {"alpha": 1.0, "gamma": 1, "beta": 0.9,
                                    "theta": theta if method == "shot" else 0.0, "cached_loader": False}, trained)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="path of matsuolab/T3A's domainbed/adapt_algorithms.py")
    stream_arguments(ap, num_samples=1000, batch_size=200)
    ap.add_argument("--methods", default="t3a,shot,shotim", help="comma-separated: t3a, shot, shotim")
    ap.add_argument("--filter-k", default="100", help="t3a: comma-separated filter sizes, one comparison each")
    ap.add_argument("--lr", type=float, default=1e-4, help="shot / shotim: Adam's learning rate, both sides")
    ap.add_argument("--theta", type=float, default=0.1, help="shot: the pseudo-label weight, both sides")
    args = ap.parse_args(argv)

    import ctta

    ref = import_reference(args.reference)
    domains = corruption_domains(args)
    make_model = model_factory(args)

    runs = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method == "t3a":
            for k in [int(v) for v in args.filter_k.split(",")]:
                name, kwargs = ours_arguments(method, k, args.lr, args.theta, args.seed)
                ours = ctta.strategies.create(name, make_model(), **kwargs)
                runs.append((f"t3a filter_k {k}", ours, official(ref, method, make_model, k, args.lr, args.theta)))
        elif method in ("shot", "shotim"):
            theta = args.theta if method == "shot" else 0.0
            name, kwargs = ours_arguments(method, 0, args.lr, args.theta, args.seed)
            ours = ctta.strategies.create(name, make_model(), **kwargs)
            theirs = official(ref, method, make_model, 0, args.lr, args.theta)
            runs.append((f"{method} lr {args.lr:g}" + (f" theta {theta:g}" if theta else ""), ours, theirs))
        else:
            ap.error(f"unknown method {method!r}: t3a, shot, shotim")

    b = args.batch_size
    source = make_model()
    print("| method | domain | source | ours | official | identical argmax % | max |diff| |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, ours, theirs in runs:
        totals = [0, 0, 0, 0, 0]
        for name, x_all, y_all in domains:
            err_src = err_o = err_r = same = 0
            diff = 0.0
            for i in range(0, len(y_all), b):
                x, y = x_all[i:i + b], y_all[i:i + b]
                o, r = ours.adapt(x).detach(), theirs(x, adapt=True).detach()
                with torch.no_grad():
                    err_src += int((source(x).argmax(1) != y).sum())
                err_o += int((o.argmax(1) != y).sum())
                err_r += int((r.argmax(1) != y).sum())
                same += int((o.argmax(1) == r.argmax(1)).sum())
                diff = max(diff, float((o - r).abs().max()))
            n = len(y_all)
            for j, v in enumerate((err_src, err_o, err_r, same, n)):
                totals[j] += v
            print(f"| {label} | {name} | {100 * err_src / n:.2f} | {100 * err_o / n:.2f} | {100 * err_r / n:.2f} | "
                  f"{100 * same / n:.2f} | {diff:.1e} |", flush=True)
        s, o, r, same, n = totals
        print(f"| {label} | **mean** | {100 * s / n:.2f} | {100 * o / n:.2f} | {100 * r / n:.2f} | "
              f"{100 * same / n:.2f} | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
