"""TPT (and VTE) against the reference benchmark's (mariodoebler/test-time-adaptation): same CLIP, images, views count.

No pretrained CLIP is reachable offline, so both sides use the in-house CLIP of ``benchmarks/inhouse_clip.py``
(``--weights PATH``, a ``ctta-open-clip`` checkpoint). Ours: ``--backbone clip`` with ``checkpoint``, ``keep_text``,
CIFAR-10 class names, and ``ctta.strategies.create("tpt", ...)`` with its YAML defaults (64 views, crop + flip).
Reference: its ``ClipTestTimePromptTuning`` (``models/custom_clip.py``) built directly around a second copy of the
same open_clip model (its loader only knows OpenAI / open_clip pretrained names), with ``n_ctx`` 4, ``ctx_init``
``a_photo_of_a``, class position ``end`` (``conf.py`` ``_C.TPT``), class names of ``cifar10_c``; its ``TPT``
(``methods/tpt.py``) with ``cfgs/imagenet_c/tpt.yaml`` (AdamW lr 5e-3, wd 0.01, 1 step, episodic; no CIFAR config
exists) and its ``AugMixAugmenter`` making the 63 views of each image as the data loader does for CIFAR
(``RandomCrop(32, padding=4)`` + flip, no AugMix, the image itself first). Two adapters, none of the reference's code:
- its ``PromptLearner`` tokenises with ``open_clip.get_tokenizer(arch)``; here the in-house model's tokenizer
  (context 16) is returned instead;
- its ``TextEncoder`` permutes to sequence-first (open_clip < 2.23); open_clip 3.x transformers are batch-first,
  so the transformer it receives permutes back (a no-op overall).
The views are random on both sides (different generators), so agreement is statistical: errors and the share of
identical argmaxes. ``--diagnostic N``: on the first N images of each domain the reference gets *our* views, and
the logits must agree to float precision.
``--method vte``: ours ``create("vte", ...)`` on the backbone with the reference's ``cifar10_templates``
(``datasets/prompts.py``, read from the checkout) as its prompt ensemble; reference: its ``ZeroShotCLIP``
(``models/model.py``, ``CLIP.PROMPT_MODE ensemble`` from ``cfgs/imagenet_c/vte.yaml``) around the same model and
its ``VTE``, the same views as for TPT.

    python benchmarks/tpt_reference.py --reference /tmp/refagree/classification --stand-ins /tmp/refagree/stand \\
        --weights /tmp/inhouse_clip.pt --data-root /work/shared/data/cifar10 \\
        --corruptions gaussian_noise,fog --num-samples 200 --seeds 1,2 --diagnostic 50
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import corruption_domains, stream_arguments  # noqa: E402
from reference_agreement import import_reference  # noqa: E402


class SequenceFirst(nn.Module):
    """A batch-first open_clip transformer called sequence-first (as the reference's TextEncoder calls it)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.inner = transformer

    def forward(self, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        return self.inner(x.permute(1, 0, 2), attn_mask=attn_mask).permute(1, 0, 2)


class ReferenceView(nn.Module):
    """The open_clip CLIP's attributes the reference's classes read, with the transformer adapted."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.visual = clip_model.visual
        self.transformer = SequenceFirst(clip_model.transformer)
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.logit_scale = clip_model.logit_scale
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)


def clip_templates(method: str):
    """Our backbone's prompts: TPT's single "photo" template; VTE: the reference's ``cifar10_templates``
    (``datasets/prompts.py`` of the checkout ``import_reference`` put on the path), its ensemble."""
    if method == "vte":
        import datasets.prompts as ref_prompts

        return list(ref_prompts.cifar10_templates)
    return "photo"


def ours_clip_spec(weights: str, method: str, templates) -> dict:
    """Our CLIP backbone's options: the in-house checkpoint, CIFAR-10 class names (text kept for TPT's prompt
    tuning), as ``ctta.backbones.create("clip", **spec)`` or a config's ``backbone`` section take them."""
    return {"num_classes": 10, "checkpoint": weights, "class_names": "cifar10", "templates": templates,
            "keep_text": method == "tpt"}


def ours_clip(weights: str, method: str, templates) -> nn.Module:
    """Our CLIP backbone (:func:`ours_clip_spec`), in eval mode."""
    import ctta

    return ctta.backbones.create("clip", **ours_clip_spec(weights, method, templates)).eval()


def reference_clip_method(method: str, weights: str, conf, registry, ref_root: str, n_views: int, seed: int,
                          lr, norm: nn.Module):
    """The reference's TPT (its ``ClipTestTimePromptTuning``) or VTE (its ``ZeroShotCLIP``) around a fresh copy of
    the in-house CLIP, with its config (``cfgs/imagenet_c/<method>.yaml``), and that config."""
    from ctta.backbones.clip import load_open_clip_checkpoint
    import models.custom_clip as custom_clip  # the reference's

    clip_model, tokenizer = load_open_clip_checkpoint(weights)
    custom_clip.get_tokenizer = lambda name: tokenizer
    cfg = conf.cfg.clone()
    cfg.merge_from_file(os.path.join(ref_root, "cfgs", "imagenet_c", f"{method}.yaml"))
    cfg.CORRUPTION.DATASET = "cifar10_c"
    cfg.TEST.N_AUGMENTATIONS = n_views
    cfg.RNG_SEED = seed
    if lr is not None:
        cfg.OPTIM.LR = lr
    if method == "vte":
        import models.model as ref_model

        ref_model.get_tokenizer = lambda name: tokenizer
        model = ref_model.ZeroShotCLIP(cfg, clip_model.eval(), "cpu", norm)
        return registry.get("vte")(cfg=cfg, model=model, num_classes=10), cfg
    model = custom_clip.ClipTestTimePromptTuning(ReferenceView(clip_model).eval(), norm, "inhouse", "cifar10_c",
                                                 n_ctx=cfg.TPT.N_CTX, ctx_init=cfg.TPT.CTX_INIT,
                                                 class_token_pos=cfg.TPT.CLASS_TOKEN_POS)
    return registry.get("tpt")(cfg=cfg, model=model, num_classes=10), cfg


def reference_views(n_views: int):
    """The reference's ``AugMixAugmenter`` as its data loader builds it for CIFAR with CLIP: the image itself and
    ``n_views - 1`` crop + flip views (no AugMix), each a tensor from a PIL image."""
    from augmentations.transforms_augmix import AugMixAugmenter
    from torchvision import transforms

    return AugMixAugmenter(None, transforms.Compose([transforms.ToTensor()]), dataset_name="cifar10_c",
                           n_views=n_views - 1, use_augmix=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="the reference checkout's classification/ folder")
    ap.add_argument("--stand-ins", default="")
    stream_arguments(ap, num_samples=200, batch_size=1)
    ap.add_argument("--seeds", default="1", help="comma-separated; each runs both sides")
    ap.add_argument("--n-views", type=int, default=64)
    ap.add_argument("--diagnostic", type=int, default=0, help="images per domain given our views on both sides")
    ap.add_argument("--method", choices=("tpt", "vte"), default="tpt")
    ap.add_argument("--lr", type=float, default=None, help="tpt: both sides' AdamW lr (default: the configs' 5e-3)")
    args = ap.parse_args(argv)

    import ctta
    from PIL import Image
    from ctta.strategies.common.confident_views import views_with_original

    ref_root = os.path.abspath(args.reference)
    conf, registry = import_reference(ref_root, args.stand_ins)

    method = args.method
    templates = clip_templates(method)
    domains = corruption_domains(args, batch_size=1)

    extra = {"lr": args.lr} if args.lr is not None and method == "tpt" else {}

    def ours_model() -> nn.Module:
        return ours_clip(args.weights, method, templates)

    def reference_method(seed: int):
        return reference_clip_method(method, args.weights, conf, registry, ref_root, args.n_views, seed, args.lr,
                                     ours_model().normalize)

    def to_pil(x: torch.Tensor) -> Image.Image:
        return Image.fromarray((x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())

    up = method.upper()
    print(f"| seed | domain | images | zero-shot | {up} ours | {up} reference | identical argmax % | s ours / ref |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    zero_shot = ours_model()
    diag = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        ours = ctta.strategies.create(method, ours_model(), n_views=args.n_views, seed=seed, **extra)
        ref, cfg = reference_method(seed)
        augmenter = reference_views(cfg.TEST.N_AUGMENTATIONS)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        tot = [0, 0, 0, 0, 0]
        for name, x_all, y_all in domains:
            e_zs = e_o = e_r = same = 0
            t_o = t_r = 0.0
            for i in range(len(y_all)):
                x = x_all[i:i + 1]
                t0 = time.time()
                o = ours.adapt(x).argmax(1)
                t1 = time.time()
                with torch.no_grad():
                    r = ref([v.unsqueeze(0) for v in augmenter(to_pil(x[0]))]).argmax(1)
                t2 = time.time()
                t_o, t_r = t_o + t1 - t0, t_r + t2 - t1
                with torch.no_grad():
                    e_zs += int(zero_shot(x).argmax(1) != y_all[i])
                e_o += int(o != y_all[i])
                e_r += int(r != y_all[i])
                same += int(o == r)
            n = len(y_all)
            for j, v in enumerate((e_zs, e_o, e_r, same, n)):
                tot[j] += v
            print(f"| {seed} | {name} | {n} | {100 * e_zs / n:.2f} | {100 * e_o / n:.2f} | {100 * e_r / n:.2f} | "
                  f"{100 * same / n:.2f} | {t_o:.0f} / {t_r:.0f} |", flush=True)
            if args.diagnostic and seed == int(args.seeds.split(",")[0]):
                probe = ctta.strategies.create(method, ours_model(), n_views=args.n_views, seed=seed, **extra)
                g = torch.Generator().manual_seed(seed)
                for i in range(min(args.diagnostic, n)):
                    x = x_all[i:i + 1]
                    probe._generator = torch.Generator()
                    probe._generator.set_state(g.get_state())
                    lo = probe.adapt(x)
                    views = views_with_original(x, args.n_views, g, augmix=False)  # the same draw, again
                    with torch.no_grad():
                        lr_ = ref([v.unsqueeze(0) for v in views])
                    diag.append(((lo - lr_).abs().max().item(), int(lo.argmax(1) == lr_.argmax(1))))
        s, o, r, same, n = tot
        print(f"| {seed} | **mean** | {n} | {100 * s / n:.2f} | {100 * o / n:.2f} | {100 * r / n:.2f} | "
              f"{100 * same / n:.2f} | |", flush=True)
    if diag:
        print(f"diagnostic (reference fed our views): {len(diag)} images, max |logit diff| "
              f"{max(d for d, _ in diag):.3g}, identical argmax {sum(s for _, s in diag)}/{len(diag)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
