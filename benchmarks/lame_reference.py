"""Agreement of our LAME with the reference benchmark's, on the same model, images, batches and order.

The reference is not part of this repository: give the ``classification/`` folder of a checkout of
mariodoebler/test-time-adaptation with ``--reference`` (its imports need ``pip install yacs iopath einops`` and two
stand-in modules on the path: ``autoattack.py`` with ``class AutoAttack: pass`` and an empty ``webdataset.py``; pass
their folder with ``--stand-ins``). The reference's LAME is built from its ``conf.py`` defaults merged with
``cfgs/cifar10_c/lame.yaml`` and called on each batch; ours through ``ctta.strategies.create("lame", model)`` with
its configured defaults. Both wrap the same backbone: the reference reads the features through its
``split_up_model`` (a ``normalize`` + ``model`` wrapper whose children end in global average pooling and the linear
head, the layout of its torchvision ResNets), which are the features ours reads through the feature API.

    python benchmarks/lame_reference.py --reference /tmp/lame_ref/classification --stand-ins /tmp/lame_ref/stand \\
        --weights ../shared/models/resnet20-12fca82f.th --data-root ../shared/data/cifar10 \\
        --corruptions gaussian_noise,impulse_noise,defocus_blur,contrast,jpeg_compression --num-samples 2000

``--dirichlet 0.01`` orders each domain's labels in long single-class runs (LAME's intended setting). Prints, per
corruption: error of the source model, of ours and of the reference; the share of identical argmaxes;
the number of batches whose Y is bit-identical (compared as log Y); the largest |Y_ours - Y_ref|.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn


class _Body(nn.Module):
    """The backbone up to its last feature map (before pooling)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_feature_map(x)


class _Inner(nn.Module):
    """children: body, global average pool, linear head (the reference drops the last and appends a flatten)."""

    def __init__(self, net: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self.body = _Body(net)
        self.pool = pool
        self.fc = net.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


class ReferenceView(nn.Module):
    """Our Classifier seen in the layout the reference's ``split_up_model`` expects for a ResNet."""

    def __init__(self, classifier: nn.Module, pool: str) -> None:
        super().__init__()
        self.normalize = classifier.normalize
        self.model = _Inner(classifier.net, nn.AdaptiveAvgPool2d(1) if pool == "adaptive" else nn.AvgPool2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="the reference checkout's classification/ folder")
    ap.add_argument("--stand-ins", default="", help="folder with autoattack.py / webdataset.py stand-ins")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--backbone", default="resnet20_cifar")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--corruptions", default="gaussian_noise,impulse_noise,defocus_blur,contrast,jpeg_compression")
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dirichlet", type=float, default=0.0,
                    help="temporally correlated labels (label_shift dirichlet with this delta); 0: i.i.d. order")
    ap.add_argument("--pool", choices=("adaptive", "avg8"), default="adaptive",
                    help="the reference side's pooling module (avg8: its WideResNet branch's AvgPool2d(8))")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import ctta

    ref_root = os.path.abspath(args.reference)
    sys.path[:0] = [p for p in (os.path.abspath(args.stand_ins) if args.stand_ins else "", ref_root) if p]
    cwd = os.getcwd()
    os.chdir(ref_root)  # the reference resolves some paths relative to its folder
    try:
        import conf  # noqa: E402  (the reference's)
        import methods  # noqa: F401,E402  registers its methods
        from utils.registry import ADAPTATION_REGISTRY  # noqa: E402
    finally:
        os.chdir(cwd)
    cfg = conf.cfg
    cfg.merge_from_file(os.path.join(ref_root, "cfgs", "cifar10_c", "lame.yaml"))
    cfg.MODEL.ARCH = "resnet20"  # split_up_model's ResNet branch: normalize + model.children()[:-1] + flatten
    cfg.TEST.BATCH_SIZE = args.batch_size

    model = ctta.backbones.create(args.backbone, weights=args.weights).eval()
    ours = ctta.strategies.create("lame", model)
    ref = ADAPTATION_REGISTRY.get("lame")(cfg=cfg, model=ReferenceView(model, args.pool), num_classes=10)
    print(f"reference cfg: LAME {dict(cfg.LAME)}, batch {cfg.TEST.BATCH_SIZE}; ours: affinity={ours.affinity} "
          f"knn={ours.knn} force_symmetry={ours.force_symmetry} lambda={ours.bound_lambda} "
          f"max_steps={ours.max_steps} tol={ours.tol}")

    stream = ctta.streams.corruption("cifar10", root=args.data_root, severity=args.severity,
                                     corruptions=args.corruptions, num_samples=args.num_samples,
                                     batch_size=args.batch_size, seed=args.seed,
                                     label_shift={"kind": "dirichlet", "delta": args.dirichlet} if args.dirichlet
                                     else None)
    rows = []
    print("| corruption | images | source error % | ours error % | reference error % | identical argmax % | "
          "bit-identical Y (batches) | max abs(Y ours - Y ref) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for seg in stream.segments:
        if seg.role != "domain":
            continue
        x_all, y_all = seg.load(torch.device("cpu"))
        n = err_src = err_ours = err_ref = same = identical = 0
        max_diff = 0.0
        t0 = time.time()
        for start in range(0, len(y_all), args.batch_size):
            x, y = x_all[start:start + args.batch_size], y_all[start:start + args.batch_size]
            with torch.no_grad():
                p_src = model(x).argmax(1)
                log_ours = ours.adapt(x)
                y_ref = ref([x])
            # ours returns log Y clamped at the smallest normal float: bring the reference's Y to the same form
            log_ref = y_ref.clamp_min(torch.finfo(y_ref.dtype).tiny).log()
            a_ours, a_ref = log_ours.argmax(1), y_ref.argmax(1)
            n += len(y)
            err_src += int((p_src != y).sum())
            err_ours += int((a_ours != y).sum())
            err_ref += int((a_ref != y).sum())
            same += int((a_ours == a_ref).sum())
            identical += int(torch.equal(log_ours, log_ref))
            max_diff = max(max_diff, float((log_ours.exp() - log_ref.exp()).abs().max()))
        batches = -(-n // args.batch_size)
        rows.append((seg.name, n, err_src, err_ours, err_ref, same))
        print(f"| {seg.name} | {n} | {100 * err_src / n:.2f} | {100 * err_ours / n:.2f} | {100 * err_ref / n:.2f} | "
              f"{100 * same / n:.2f} | {identical}/{batches} | {max_diff:.1e} |", flush=True)
        print(f"  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    n = sum(r[1] for r in rows)
    print(f"| mean | {n} | {100 * sum(r[2] for r in rows) / n:.2f} | {100 * sum(r[3] for r in rows) / n:.2f} | "
          f"{100 * sum(r[4] for r in rows) / n:.2f} | {100 * sum(r[5] for r in rows) / n:.2f} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
