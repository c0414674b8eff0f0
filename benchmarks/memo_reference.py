"""MEMO against the reference benchmark's (mariodoebler/test-time-adaptation): same model, images and order.

The reference draws its AugMix views in the data loader (``datasets/data_loading.py``: ``AugMixAugmenter`` of
``augmentations/transforms_augmix.py`` on each PIL image, numpy's global random state) and its ``MEMO`` adapts on
``x[1:]`` and predicts ``x[0]``. Here the reference's ``AugMixAugmenter`` (imported from the checkout, with
``base_transform`` None and ``ToTensor`` as for CIFAR) makes its views from each image as an 8-bit PIL image, and
its ``MEMO`` (``cfgs/cifar10_c/memo.yaml`` over ``conf.py``) is called as ``tta([x] + views)``; ours is
``ctta.strategies.create("memo", model, seed=...)`` on the same images, one batch per image (the config's batch 1).
The views are random on both sides and drawn by different generators, so agreement is statistical: the script
reports both errors, the share of identical argmaxes, and both sides at a second seed.

    python benchmarks/memo_reference.py --reference /tmp/refagree/classification --stand-ins /tmp/refagree/stand \\
        --weights ../shared/models/resnet20-12fca82f.th --data-root ../shared/data/cifar10 --num-samples 200

It contains none of the reference's code; helpers come from ``benchmarks/reference_agreement.py``.
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
from reference_agreement import import_reference  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="the reference checkout's classification/ folder")
    ap.add_argument("--stand-ins", default="")
    stream_arguments(ap, num_samples=200, batch_size=1)
    ap.add_argument("--seeds", default="1,2", help="comma-separated; each runs both sides")
    args = ap.parse_args(argv)

    import ctta
    from PIL import Image
    from torchvision import transforms

    ref_root = os.path.abspath(args.reference)
    conf, registry = import_reference(ref_root, args.stand_ins)
    from augmentations.transforms_augmix import AugMixAugmenter  # the reference's

    domains = corruption_domains(args, batch_size=1)
    make_model = model_factory(args)

    def to_pil(x: torch.Tensor) -> Image.Image:
        return Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())

    print("| seed | domain | images | source | MEMO ours | MEMO reference | identical argmax % | s ours / ref |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    source = make_model()
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = conf.cfg.clone()
        cfg.merge_from_file(os.path.join(ref_root, "cfgs", "cifar10_c", "memo.yaml"))
        cfg.RNG_SEED = seed
        ours = ctta.strategies.create("memo", make_model(), seed=seed)
        ref = registry.get("memo")(cfg=cfg, model=make_model(), num_classes=10)
        augmenter = AugMixAugmenter(None, transforms.Compose([transforms.ToTensor()]), dataset_name="cifar10_c",
                                    n_views=cfg.TEST.N_AUGMENTATIONS, use_augmix=True)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        tot = [0, 0, 0, 0, 0]
        for name, x_all, y_all in domains:
            e_src = e_o = e_r = same = 0
            t_o = t_r = 0.0
            for i in range(len(y_all)):
                x = x_all[i:i + 1]
                t0 = time.time()
                o = ours.adapt(x).argmax(1)
                t1 = time.time()
                views = augmenter(to_pil(x[0]))
                r = ref([v.unsqueeze(0) for v in views]).argmax(1)
                t2 = time.time()
                t_o, t_r = t_o + t1 - t0, t_r + t2 - t1
                with torch.no_grad():
                    e_src += int(source(x).argmax(1) != y_all[i])
                e_o += int(o != y_all[i])
                e_r += int(r != y_all[i])
                same += int(o == r)
            n = len(y_all)
            for j, v in enumerate((e_src, e_o, e_r, same, n)):
                tot[j] += v
            print(f"| {seed} | {name} | {n} | {100 * e_src / n:.2f} | {100 * e_o / n:.2f} | {100 * e_r / n:.2f} | "
                  f"{100 * same / n:.2f} | {t_o:.0f} / {t_r:.0f} |", flush=True)
        s, o, r, same, n = tot
        print(f"| {seed} | **mean** | {n} | {100 * s / n:.2f} | {100 * o / n:.2f} | {100 * r / n:.2f} | "
              f"{100 * same / n:.2f} | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
