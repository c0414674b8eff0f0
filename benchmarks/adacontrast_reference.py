"""AdaContrast against the reference benchmark's (mariodoebler/test-time-adaptation@8b2ed63): same model, images, order.

The reference makes AdaContrast's views in its data loader (``datasets/data_loading.py``:
``get_augmentation_versions(aug_versions="twss", aug_type="moco-v2-light", res_size=(32, 32), crop_size=32)`` of
``augmentations/transforms_adacontrast.py``, per PIL image, torch's and python's global generators). Here that
transform, imported from the checkout, makes its weak and two strong views from each of our images as an 8-bit PIL
image; the test view is our image itself. Its ``AdaContrast`` (``cfgs/cifar10_c/adacontrast.yaml`` over ``conf.py``)
is called as ``tta([x, weak, strong, strong])``; its ``BaseModel`` split (``models.model.split_up_model``) returns
our backbone's ``forward_features`` and linear head, and its random queue start is replaced by ours (both drawn from
seeded generators; ours: the strategy's seed). Ours is ``ctta.strategies.create("adacontrast", model, seed=...)``,
which draws its views on the device. Views differ, so agreement is statistical; ``--our-views`` (a diagnostic) feeds
the reference the views ours drew, which should then agree to float precision.

    python benchmarks/adacontrast_reference.py --reference /tmp/refagree/classification \\
        --stand-ins /tmp/refagree/stand --weights ../shared/models/resnet20-12fca82f.th \\
        --data-root ../shared/data/cifar10 --num-samples 1000 [--our-views]

It contains none of the reference's code; helpers come from ``benchmarks/harness.py`` / ``reference_agreement.py``.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import corruption_domains, model_factory, stream_arguments  # noqa: E402
from reference_agreement import _Call, import_reference  # noqa: E402


def split(model, arch_name=None, dataset_name=None):
    """The reference's encoder / fc split, ours: pooled features and the linear head."""
    return _Call(model, "forward_features"), getattr(model.net, getattr(model.net, "head_attr", "linear"))


def use_our_split() -> None:
    """The reference's ``models.model.split_up_model`` (its ``BaseModel`` calls it) replaced by :func:`split`; call
    after ``import_reference``."""
    sys.modules["models.model"].split_up_model = split


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="the reference checkout's classification/ folder")
    ap.add_argument("--stand-ins", default="")
    stream_arguments(ap, num_samples=1000, batch_size=200)
    ap.add_argument("--our-views", action="store_true", help="diagnostic: the reference adapts on the views ours drew")
    args = ap.parse_args(argv)

    import ctta
    from PIL import Image

    ref_root = os.path.abspath(args.reference)
    conf, registry = import_reference(ref_root, args.stand_ins)
    from augmentations.transforms_adacontrast import get_augmentation_versions  # the reference's

    use_our_split()
    domains = corruption_domains(args)
    make_model = model_factory(args)
    cfg = conf.cfg.clone()
    cfg.merge_from_file(os.path.join(ref_root, "cfgs", "cifar10_c", "adacontrast.yaml"))
    cfg.TEST.BATCH_SIZE, cfg.RNG_SEED = args.batch_size, args.seed
    ours = ctta.strategies.create("adacontrast", make_model(), seed=args.seed)
    ref = registry.get("adacontrast")(cfg=cfg, model=make_model(), num_classes=10)
    ref.model.mem_feat.copy_(ours.queue_feats)
    ref.model.mem_labels.copy_(ours.queue_labels)
    twss = get_augmentation_versions(aug_versions="twss", aug_type="moco-v2-light", res_size=(32, 32), crop_size=32)
    drawn = {}
    if args.our_views:
        our_views = ours.views

        def kept(x):
            drawn["views"] = our_views(x)
            return drawn["views"]

        ours.views = kept

    def to_pil(x: torch.Tensor) -> Image.Image:
        return Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())

    def reference_views(x: torch.Tensor):
        per_image = [twss(to_pil(img)) for img in x]
        return [torch.stack([v[j] for v in per_image]) for j in (1, 2, 3)]

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    print(f"\n### adacontrast, {'views drawn by ours' if args.our_views else 'own views each side'}: lr "
          f"{cfg.OPTIM.LR}, T {cfg.CONTRAST.TEMPERATURE}, m {cfg.M_TEACHER.MOMENTUM}, queue {cfg.ADACONTRAST.QUEUE_SIZE},"
          f" k {cfg.ADACONTRAST.NUM_NEIGHBORS}, batch {args.batch_size}, seed {args.seed}", flush=True)
    print("| corruption | images | ours error % | reference error % | difference (points) | identical argmax % | "
          "max abs(logit difference) | s ours / s reference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    tot = dict(n=0, eo=0, er=0, same=0)
    worst = 0.0
    for name, x_all, y_all in domains:
        n = eo = er = same = 0
        diff, t_o, t_r = 0.0, 0.0, 0.0
        for i in range(0, len(y_all), args.batch_size):
            x, y = x_all[i:i + args.batch_size], y_all[i:i + args.batch_size]
            t0 = time.time()
            out_o = ours.adapt(x).detach()
            t1 = time.time()
            views = list(drawn["views"]) if args.our_views else reference_views(x)
            out_r = ref([x] + views).detach()
            t2 = time.time()
            t_o, t_r = t_o + t1 - t0, t_r + t2 - t1
            n += len(y)
            eo += int((out_o.argmax(1) != y).sum())
            er += int((out_r.argmax(1) != y).sum())
            same += int((out_o.argmax(1) == out_r.argmax(1)).sum())
            diff = max(diff, float((out_o - out_r).abs().max()))
        worst = max(worst, diff)
        for k, v in (("n", n), ("eo", eo), ("er", er), ("same", same)):
            tot[k] += v
        print(f"| {name} | {n} | {100 * eo / n:.2f} | {100 * er / n:.2f} | {100 * (eo - er) / n:+.2f} | "
              f"{100 * same / n:.2f} | {diff:.1e} | {t_o:.0f} / {t_r:.0f} |", flush=True)
    n = tot["n"]
    print(f"| mean | {n} | {100 * tot['eo'] / n:.2f} | {100 * tot['er'] / n:.2f} | "
          f"{100 * (tot['eo'] - tot['er']) / n:+.2f} | {100 * tot['same'] / n:.2f} | {worst:.1e} | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
