"""TPT: the confidence selection keeps the lowest-entropy share, only the prompt context is tuned, episodes reset it,
lr 0 is zero-shot CLIP with "a photo of a {}.", and runs are deterministic under a seed."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("open_clip")

from ctta.backbones import create as create_backbone  # noqa: E402
from ctta.errors import ConfigError, UnsupportedError  # noqa: E402
from ctta.strategies import create  # noqa: E402
from ctta.strategies.common.confident_views import select_confident, views_with_original  # noqa: E402
from ctta.strategies.memo import marginal_entropy as average_entropy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def clip_model(templates: str = "photo", keep_text: bool = True):
    torch.manual_seed(0)
    return create_backbone("clip_tiny", num_classes=10, class_names="cifar10", templates=templates,
                           keep_text=keep_text).eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_confident_selection_keeps_the_lowest_entropy_tenth():
    logits = torch.zeros(20, 5)  # uniform rows: maximal entropy
    sharp = {3: 9.0, 11: 6.0, 17: 3.0}  # one large logit: the larger, the lower the entropy
    for row, v in sharp.items():
        logits[row, row % 5] = v
    idx = select_confident(logits, 0.1)
    assert idx.tolist() == [3, 11]  # int(20 * 0.1) = 2 rows, most confident first
    assert select_confident(logits, 0.15).tolist() == [3, 11, 17]


def test_average_entropy_is_the_entropy_of_the_mean_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    p = logits.softmax(1).mean(0)
    assert torch.allclose(average_entropy(logits), -(p * p.log()).sum(), atol=1e-6)
    assert math.isclose(float(average_entropy(torch.zeros(4, 8))), math.log(8), rel_tol=1e-6)


def test_views_are_the_image_first_then_random_crops():
    x = images(1)
    v = views_with_original(x, 8, torch.Generator().manual_seed(0), augmix=False)
    assert v.shape == (8, 3, 32, 32) and torch.equal(v[0], x[0])
    assert not torch.equal(v[1], v[2])


def test_only_the_prompt_context_changes_never_the_towers():
    s = create("tpt", clip_model(), n_views=16, lr=0.05, seed=0)
    assert [p for g in s.optimizer.param_groups for p in g["params"]] == [s.prompt.ctx]
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    ctx0 = s.prompt.ctx.detach().clone()
    s.prompt.reset = lambda: None  # keep the tuned context to look at it
    s.adapt(images(1))
    assert not torch.allclose(s.prompt.ctx, ctx0)
    after = s.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in s.model.parameters())


def test_episodic_reset_restores_the_context_and_optimizer():
    s = create("tpt", clip_model(), n_views=16, lr=0.05, seed=0)
    ctx0 = s.prompt.ctx.detach().clone()
    x = images(3)
    out = s.adapt(x)
    assert torch.equal(s.prompt.ctx, ctx0) and not s.optimizer.state
    # every image starts from the initial prompt: image 2 alone, with the generator where it was, gives the same
    t = create("tpt", clip_model(), n_views=16, lr=0.05, seed=0)
    t.adapt(x[:2])
    assert torch.allclose(t.adapt(x[2:]), out[2:], atol=1e-6)


def test_lr_zero_is_zero_shot_clip_with_the_initial_prompt():
    zero_shot = clip_model("photo", keep_text=False)  # "a photo of a {}." through CLIP.encode_text
    s = create("tpt", clip_model(), n_views=16, lr=0.0, weight_decay=0.0, seed=0)
    x = images(3)
    with torch.no_grad():
        expected = zero_shot(x)
    assert torch.allclose(s.adapt(x), expected, atol=1e-5)
    assert torch.allclose(s.predict(x), expected, atol=1e-5)
    tuned = create("tpt", clip_model(), n_views=16, lr=0.05, seed=0).adapt(x)
    assert not torch.allclose(tuned, expected, atol=1e-4)  # a real step changes the prediction


def test_deterministic_under_a_seed():
    x = images(2)
    a = create("tpt", clip_model(), n_views=16, lr=0.05, seed=3).adapt(x)
    b = create("tpt", clip_model(), n_views=16, lr=0.05, seed=3).adapt(x)
    c = create("tpt", clip_model(), n_views=16, lr=0.05, seed=4).adapt(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_needs_a_clip_backbone_with_its_text_tower():
    with pytest.raises(ConfigError, match="keep_text"):
        create("tpt", clip_model(keep_text=False))
    torch.manual_seed(0)
    with pytest.raises(UnsupportedError):
        create("tpt", create_backbone("tiny_cnn", num_classes=10))


def test_vte_averages_the_confident_views_features():
    """VTE on a hand-checked case: the mean of the kept views' normalised features through the zero-shot head."""
    import torch.nn.functional as F

    net = clip_model("photo", keep_text=False)
    s = create("vte", net, n_views=20, selection_p=0.1, seed=5)
    x = images(1)
    out = s.adapt(x)
    views = views_with_original(x, 20, torch.Generator().manual_seed(5), augmix=False)
    with torch.no_grad():
        f = F.normalize(net.forward_features(views), dim=-1)
        logits = net(views)
        keep = select_confident(logits, 0.1)
        expected = net.net.logit_scale.exp() * f[keep].mean(0, keepdim=True) @ net.net.text_features.t()
    assert len(keep) == 2 and torch.allclose(out, expected, atol=1e-5)
    assert all(not p.requires_grad for p in s.model.parameters())
    one = create("vte", clip_model("photo", keep_text=False), n_views=1, selection_p=1.0, seed=5)
    with torch.no_grad():
        assert torch.allclose(one.adapt(x), net(x), atol=1e-5)  # one view, all kept: zero-shot CLIP
