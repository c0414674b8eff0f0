"""CLIP as a classifier: an open_clip image encoder plus a zero-shot head built once from class names and prompts.

``create("clip", num_classes=C, model="ViT-B-32", pretrained_tag="openai", class_names=[...])`` gives a
:class:`~ctta.backbones.Classifier` whose logits are ``logit_scale * normalize(f(x)) @ normalize(T).T``, with ``T``
the per-class text features (mean of the normalised prompt embeddings, re-normalised: CLIP's prompt ensembling),
computed once at construction and kept as a buffer; the text tower is then dropped (it is never needed again).

Choices, and why:
- Weights: ``pretrained_tag`` (an open_clip tag such as ``openai`` or ``laion2b_s34b_b79k``) downloads through
  open_clip (needs internet or a warm cache; offline it is a one-line :class:`CheckpointError`). The factory's
  ``pretrained`` flag of :func:`ctta.backbones.create` is refused for registered backbones, so the tag is an option
  of its own. ``weights=PATH`` loads a checkpoint of this wrapper (``visual.*``, ``text_features``, ...).
- Class names: the backbone option ``class_names`` (a list in the model's output order, or ``cifar10`` /
  ``cifar100`` / ``digits``); streams do not carry names, and the source model's label order is what the head
  must match. Without it, 10 or 100 classes default to the CIFAR names, anything else to ``class 0``, ``class 1``...
  (logged as a warning: a zero-shot head on placeholder names is meaningless, but the backbone still builds).
- Prompts: ``templates`` = ``photo`` (one prompt), ``simple`` (open_clip's 7 SIMPLE_IMAGENET_TEMPLATES, default),
  ``openai`` (the 80 OpenAI ImageNet prompts) or a list of ``{}``-format strings.
- Inputs of another size than the encoder's (32 x 32 CIFAR into a 224 x 224 ViT) are resized bicubically inside
  the network (after CLIP's normalisation, which commutes with resizing up to the interpolation overshoot).
- ``model`` defaults to ``tiny`` (no download, builds in a second: every registered backbone is built with its
  defaults by the test suite, and a random ViT-B/32 with its text tower takes ~20 s on a busy 2-core CPU); real use
  names an open_clip model, e.g. ``model=ViT-B-32, pretrained_tag=openai``.
- ``clip_tiny`` (= ``clip`` with ``model=tiny`` and one prompt) is a randomly initialised 2-layer ViT / 1-layer
  text transformer (open_clip's ``CLIP`` class with a custom config, its bundled BPE tokenizer), for tests.
- ``checkpoint=PATH`` builds a whole open_clip ``CLIP`` (both towers) from a local file
  ``{"format": "ctta-open-clip", "config": {"embed_dim", "vision_cfg", "text_cfg"}, "state_dict": ...}`` (what
  ``benchmarks/inhouse_clip.py`` writes), so a CLIP trained in house with a custom config gets its zero-shot head
  from any ``class_names`` / ``templates``; ``weights=PATH`` instead needs this wrapper's own state dict (the head
  already computed). With ``checkpoint``, ``model`` and ``pretrained_tag`` are ignored (a logged warning unless
  they are unset / ``tiny``: ``--set`` cannot unset the vilaad YAML's ``ViT-B-32``/``openai`` teacher defaults).
- ``keep_text=true`` keeps the text tower (:class:`TextTower`, frozen by whoever adapts) and the tokenizer, for
  prompt-tuning strategies (tpt) that re-encode learnable prompts; off by default (memory, checkpoint size).

open_clip is imported inside functions only (it is optional on some machines).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from .spec import register_backbone

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
    "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail "    "snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout "
    "tulip turtle wardrobe whale willow_tree wolf woman worm").split()
NAMED_CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES, "digits": DIGIT_CLASSES}

# a tiny randomly initialised CLIP (tests): 32 x 32 images, 8 x 8 patches, 32-d embeddings
TINY_CONFIG = {"embed_dim": 32,
               "vision_cfg": {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def resolve_class_names(class_names: Union[None, str, Sequence[str]], num_classes: int) -> List[str]:
    """Class names in output order: a list, a data set name, or (None) CIFAR names / placeholders by class count."""
    if isinstance(class_names, str):
        if class_names not in NAMED_CLASSES:
            raise ConfigError(f"class_names must be a list of names or one of {', '.join(NAMED_CLASSES)}, "
                              f"got {class_names!r}")
        names = list(NAMED_CLASSES[class_names])
    elif class_names is None:
        names = {10: CIFAR10_CLASSES, 100: CIFAR100_CLASSES}.get(num_classes) or [f"class {i}"
                                                                               for i in range(num_classes)]
        log.warning("clip backbone: no class_names given; using %s for the zero-shot head",
                    "CIFAR class names" if num_classes in (10, 100) else "placeholder names")
        names = list(names)
    else:
        names = [str(c) for c in class_names]
    if len(names) != num_classes:
        raise ConfigError(f"clip backbone: {len(names)} class names for num_classes={num_classes}")
    return [n.replace("_", " ") for n in names]


def resolve_templates(templates: Union[str, Sequence[str]]) -> List[str]:
    """Prompt templates (``{}`` = the class name): ``photo``, ``simple``, ``openai`` or an explicit list."""
    if isinstance(templates, str):
        if templates == "photo":
            return ["a photo of a {}."]
        from open_clip import zero_shot_metadata as meta

        if templates == "simple":
            return [t("{}") for t in meta.SIMPLE_IMAGENET_TEMPLATES]
        if templates == "openai":
            return [t("{}") for t in meta.OPENAI_IMAGENET_TEMPLATES]
        raise ConfigError(f"templates must be photo, simple, openai or a list of '{{}}' prompts, got {templates!r}")
    out = [str(t) for t in templates]
    if not out or any("{}" not in t for t in out):
        raise ConfigError(f"every prompt template must contain '{{}}' for the class name, got {out}")
    return out


@torch.no_grad()
def class_text_features(clip_model: nn.Module, tokenizer: Any, class_names: Sequence[str],
                        templates: Sequence[str]) -> Tensor:
    """C x E: per class, the mean of the L2-normalised prompt embeddings, L2-normalised again (prompt ensembling)."""
    was_training = clip_model.training
    clip_model.eval()
    rows = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates])
        emb = F.normalize(clip_model.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    clip_model.train(was_training)
    return torch.stack(rows)


class TextTower(nn.Module):
    """open_clip CLIP's text transformer taking token *embeddings* (so context vectors can be learned, CoOp / TPT)."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.transformer = clip_model.transformer
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.pool_type = getattr(clip_model, "text_pool_type", "argmax")
        self.eos_id = getattr(clip_model, "text_eos_id", None)
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)

    def embed(self, tokens: Tensor) -> Tensor:
        """N x L token ids -> N x L x D token embeddings (no positional term)."""
        return self.token_embedding(tokens)

    def forward(self, embeddings: Tensor, tokens: Tensor) -> Tensor:
        """N x L x D prompt embeddings (+ their token ids, for the EOT position) -> N x E text features, as
        ``CLIP.encode_text`` computes them from the token ids (unnormalised)."""
        from open_clip.transformer import text_global_pool

        x = embeddings + self.positional_embedding.to(embeddings.dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is None:
            return x
        return self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection


class CLIPZeroShot(nn.Module):
    """CLIP's image encoder + a fixed zero-shot head (cached class text features times CLIP's logit scale).

    Feature API as the other backbones: ``forward_features`` = image embedding (N x E, before normalisation),
    ``forward_head`` = ``exp(logit_scale) * normalize(f) @ text_features.T``.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Any, class_names: Sequence[str],
                 templates: Sequence[str], keep_text: bool = False) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.templates = list(templates)
        text = class_text_features(clip_model, tokenizer, self.class_names, self.templates)
        self.visual = clip_model.visual
        self.logit_scale = nn.Parameter(clip_model.logit_scale.detach().clone())
        self.register_buffer("text_features", text)
        size = getattr(self.visual, "image_size", None)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else ((size, size) if size else None)
        self.num_classes = len(self.class_names)
        self.feature_dim = int(text.shape[1])
        self.text: Optional[TextTower] = TextTower(clip_model) if keep_text else None
        self.tokenizer = tokenizer if keep_text else None

    def forward_features(self, x: Tensor) -> Tensor:
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False)
        return self.visual(x)

    def forward_head(self, features: Tensor) -> Tensor:
        f = F.normalize(features, dim=-1)
        return self.logit_scale.exp() * f @ self.text_features.to(f.dtype).t()

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ConfigError("the clip backbones need open_clip: pip install open-clip-torch") from None
    return open_clip


def build_open_clip(model: str, pretrained_tag: Optional[str] = None, cache_dir: Optional[str] = None):
    """(open_clip model, tokenizer) for ``model``; weights ``pretrained_tag`` downloaded by open_clip when given."""
    open_clip = _open_clip()
    if model == "tiny":
        if pretrained_tag:
            raise ConfigError("the tiny CLIP config has no pretrained weights")
        from open_clip.model import CLIP
        from open_clip.tokenizer import SimpleTokenizer

        net = CLIP(embed_dim=TINY_CONFIG["embed_dim"], vision_cfg=dict(TINY_CONFIG["vision_cfg"]),
                   text_cfg=dict(TINY_CONFIG["text_cfg"]))
        return net, SimpleTokenizer(context_length=TINY_CONFIG["text_cfg"]["context_length"])
    known = open_clip.list_models()
    if model not in known and not str(model).startswith("hf-hub:"):
        import difflib

        close = difflib.get_close_matches(str(model), known, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown open_clip model {model!r}.{hint} See open_clip.list_models()")
    if pretrained_tag:
        tags = [t for m, t in open_clip.list_pretrained() if m == model]
        if not str(model).startswith("hf-hub:") and pretrained_tag not in tags:
            raise ConfigError(f"open_clip model {model!r} has no pretrained tag {pretrained_tag!r}; "
                              f"known: {', '.join(tags) or 'none'}")
        try:
            net = open_clip.create_model(model, pretrained=pretrained_tag, cache_dir=cache_dir)
        except Exception as e:  # network / hub / file errors: one line, not a traceback from the hub client
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"could not load open_clip weights {model}/{pretrained_tag} (needs internet or a "
                                  f"cached copy; offline, pass a local checkpoint with weights=PATH): "
                                  f"{first[:200]}") from None
    else:
        root = logging.getLogger()  # open_clip logs "initialized randomly" on the root logger: expected here
        was = root.disabled
        root.disabled = True
        try:
            net = open_clip.create_model(model)
        finally:
            root.disabled = was
    try:
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as e:
        raise CheckpointError(f"could not build the tokenizer of open_clip model {model!r}: {str(e)[:200]}") from None
    return net, tokenizer


CHECKPOINT_FORMAT = "ctta-open-clip"


def load_open_clip_checkpoint(path: Union[str, Path]):
    """(open_clip CLIP, tokenizer) from a local ``ctta-open-clip`` checkpoint: custom config + full state dict."""
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer

    from .checkpoint import read_checkpoint

    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"clip checkpoint {file} does not exist")
    obj = read_checkpoint(file)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"clip checkpoint {file} is not a {CHECKPOINT_FORMAT!r} file (config + state_dict); "
                              f"got format {got!r}; a checkpoint of the clip backbone itself loads with weights=PATH")
    config, state = obj.get("config"), obj.get("state_dict")
    if (not isinstance(config, dict) or not isinstance(state, dict)
            or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config)):
        raise CheckpointError(f"clip checkpoint {file} needs 'config' (embed_dim, vision_cfg, text_cfg) and "
                              f"'state_dict'; got keys {sorted(obj)}")
    try:
        net = CLIP(embed_dim=int(config["embed_dim"]), vision_cfg=dict(config["vision_cfg"]),
                   text_cfg=dict(config["text_cfg"]))
    except Exception as e:
        raise CheckpointError(f"clip checkpoint {file}: open_clip cannot build its config: {str(e)[:200]}") from None
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise CheckpointError(f"clip checkpoint {file} does not match its config: "
                              f"{(lines or [str(e).strip()])[0][:200]}") from None
    if missing or unexpected:
        raise CheckpointError(f"clip checkpoint {file} does not match its config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    context = int(config["text_cfg"].get("context_length", 77))
    return net, SimpleTokenizer(context_length=context)


def clip_zero_shot(num_classes: int = 10, model: Optional[str] = None, pretrained_tag: Optional[str] = None,
                   class_names: Union[None, str, Sequence[str]] = None,
                   templates: Union[str, Sequence[str]] = "simple", cache_dir: Optional[str] = None,
                   checkpoint: Union[None, str, Path] = None, keep_text: bool = False) -> CLIPZeroShot:
    """Build the zero-shot CLIP network (see the module docstring for the options); ``model`` None = ViT-B-32."""
    names = resolve_class_names(class_names, int(num_classes))
    prompts = resolve_templates(templates)
    if checkpoint not in (None, ""):
        if pretrained_tag or model not in (None, "tiny"):  # e.g. the vilaad YAML's teacher defaults, merged in
            log.warning("clip backbone: checkpoint=%s brings its own model config and weights; ignoring model=%r "
                        "and pretrained_tag=%r", checkpoint, model, pretrained_tag)
        net, tokenizer = load_open_clip_checkpoint(checkpoint)
    else:
        net, tokenizer = build_open_clip(model or "ViT-B-32", pretrained_tag, cache_dir)
    return CLIPZeroShot(net, tokenizer, names, prompts, keep_text=keep_text).eval()


@register_backbone("clip", CLIP_MEAN, CLIP_STD, num_classes=10)
def clip(num_classes: int = 10, model: str = "tiny", pretrained_tag: Optional[str] = None,
         class_names: Union[None, str, Sequence[str]] = None, templates: Union[str, Sequence[str]] = "simple",
         cache_dir: Optional[str] = None, checkpoint: Optional[str] = None,
         keep_text: bool = False) -> CLIPZeroShot:
    """open_clip CLIP zero-shot classifier (model=open_clip name e.g. ViT-B-32, pretrained_tag=e.g. openai, or
    checkpoint=a local ``ctta-open-clip`` file; keep_text: keep the text tower for prompt tuning)."""
    return clip_zero_shot(num_classes, model, pretrained_tag, class_names, templates, cache_dir, checkpoint, keep_text)


@register_backbone("clip_tiny", CLIP_MEAN, CLIP_STD, num_classes=10)
def clip_tiny(num_classes: int = 10, class_names: Union[None, str, Sequence[str]] = None,
              templates: Union[str, Sequence[str]] = "photo", keep_text: bool = False) -> CLIPZeroShot:
    """Tiny randomly initialised CLIP (2-layer ViT, 1-layer text transformer, 32-d) zero-shot classifier, for tests."""
    return clip_zero_shot(num_classes, "tiny", None, class_names, templates, keep_text=keep_text)


__all__ = ["CHECKPOINT_FORMAT", "CLIPZeroShot", "CLIP_MEAN", "CLIP_STD", "TINY_CONFIG", "TextTower",
           "build_open_clip", "class_text_features", "clip_zero_shot", "load_open_clip_checkpoint",
           "resolve_class_names", "resolve_templates"]
