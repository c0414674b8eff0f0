"""Invariants that catch a wrong implementation of the baseline strategies and CoTTA."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ctta import strategies
from ctta.strategies.common import TTAAugment, AugmentConfig, view_grouped_batchnorm

from conftest import make_tiny


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_source_changes_nothing(tiny_model, images):
    before = _state(tiny_model)
    s = strategies.create("source", tiny_model)
    out = [s.adapt(images) for _ in range(3)]
    assert _changed(before, _state(tiny_model)) == set()
    assert torch.equal(out[0], out[2])
    ref = make_tiny()
    torch.testing.assert_close(out[0], ref(images))


def test_bn_uses_batch_statistics_and_changes_no_state(tiny_model, images):
    before = _state(tiny_model)
    s = strategies.create("bn", tiny_model)
    logits = s.adapt(images)
    assert _changed(before, _state(tiny_model)) == set(), "BN adaptation must not touch parameters or buffers"
    # hand-computed: first layer normalised with the batch's own mean and biased variance
    ref = make_tiny().requires_grad_(False)
    h = ref.conv1(images)
    mu, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
    h = torch.relu(F.batch_norm(h, mu, var, ref.bn1.weight, ref.bn1.bias, False, 0.0, ref.bn1.eps))
    h = ref.conv2(h)
    mu, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3), unbiased=False)
    h = torch.relu(F.batch_norm(h, mu, var, ref.bn2.weight, ref.bn2.bias, False, 0.0, ref.bn2.eps))
    torch.testing.assert_close(logits, ref.fc(h.mean(dim=(2, 3))))
    assert not torch.allclose(logits, ref(images)), "batch statistics must differ from the source statistics"


def test_tent_updates_only_norm_affines(tiny_model, images):
    before = _state(tiny_model)
    s = strategies.create("tent", tiny_model, lr=1e-2)
    first = s.adapt(images)
    for _ in range(5):
        s.adapt(images)
    changed = _changed(before, _state(tiny_model))
    assert changed == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    # the prediction returned is the one before the update, and entropy goes down
    ent = lambda z: -(z.softmax(1) * z.log_softmax(1)).sum(1).mean()  # noqa: E731
    assert ent(s.predict(images)) < ent(first)


def test_tent_hyperparameters_from_the_paper():
    s = strategies.create("tent", make_tiny())
    g = s.optimizer.param_groups[0]
    assert isinstance(s.optimizer, torch.optim.Adam)
    assert g["lr"] == pytest.approx(1e-3) and g["betas"] == (0.9, 0.999) and g["weight_decay"] == 0.0


def test_cotta_restore_probability_one_returns_to_source(tiny_model, images):
    source = {k: v.clone() for k, v in tiny_model.named_parameters()}
    s = strategies.create("cotta", tiny_model, rst=1.0, lr=1e-1, views=4)
    s.adapt(images)
    for name, p in s.model.named_parameters():
        assert torch.equal(p, source[name]), name


def test_cotta_teacher_is_ema_of_student(tiny_model, images):
    s = strategies.create("cotta", tiny_model, rst=0.0, lr=1e-2, views=4, mt=0.9)
    teacher_before = {k: v.clone() for k, v in s.teacher.named_parameters()}
    s.adapt(images)
    student = dict(s.model.named_parameters())
    assert any(not torch.equal(student[k], teacher_before[k]) for k in student)
    for k, t in s.teacher.named_parameters():
        torch.testing.assert_close(t, 0.9 * teacher_before[k] + 0.1 * student[k], atol=1e-6, rtol=0)


def test_cotta_uses_augmented_teacher_only_when_unconfident(tiny_model, images):
    # the output is the pseudo-label made before the update, so the learning rate plays no part here
    s = strategies.create("cotta", tiny_model, views=4, ap=0.0, rst=0.0)  # confident: plain teacher
    plain = s.teacher(images)
    torch.testing.assert_close(s.adapt(images), plain)
    s = strategies.create("cotta", make_tiny(), views=4, ap=1.0, rst=0.0)  # unconfident (confidence < 1): averaged
    assert not torch.allclose(s.adapt(images), plain)


def test_cotta_settings_from_the_paper():
    s = strategies.create("cotta", make_tiny())
    assert (s.mt, s.rst, s.ap, s.views) == (0.999, 0.01, 0.92, 32)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    n_all = sum(p.numel() for p in s.model.parameters())
    assert sum(p.numel() for p in s.trainable_parameters()) == n_all


def test_cotta_is_deterministic_under_a_seed(images):
    runs = []
    for _ in range(2):
        s = strategies.create("cotta", make_tiny(), views=4, seed=3, ap=1.0)
        runs.append([s.adapt(images) for _ in range(3)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    s = strategies.create("cotta", make_tiny(), views=4, seed=4, ap=1.0)
    assert not torch.equal(s.adapt(images), runs[0][0])


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_cotta_view_chunks_do_not_change_the_pseudo_label(images, chunk):
    """Views batched through the teacher with per-view BN statistics equal one forward per view."""
    outs = []
    for c in (1, chunk):
        s = strategies.create("cotta", make_tiny(), views=4, views_per_chunk=c, seed=0)
        outs.append(s.augmented_prediction(images))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_grouped_batchnorm_equals_separate_forwards(images):
    m = make_tiny().train()
    for bn in (m.bn1, m.bn2):
        bn.track_running_stats = False
    a, b = images[:8], images[8:] * 0.5 + 0.2
    with torch.no_grad():
        separate = torch.cat([m(a), m(b)])
        with view_grouped_batchnorm(m, 2):
            grouped = m(torch.cat([a, b]))
        joint = m(torch.cat([a, b]))
    torch.testing.assert_close(grouped, separate, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(joint, separate, atol=1e-4)
    assert type(m.bn1) is torch.nn.BatchNorm2d  # restored on exit


def test_augment_identity_and_determinism(images):
    ident = AugmentConfig(brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), hue=(0, 0), gamma=(1, 1),
                          degrees=(0, 0), translate=0.0, scale=(1, 1), blur_sigma=(1e-3, 1e-3), hflip_p=0.0,
                          noise_std=0.0)
    out = TTAAugment(ident)(images, 3).view(3, *images.shape)
    torch.testing.assert_close(out, images.expand(3, *images.shape), atol=1e-5, rtol=0)
    a, b = TTAAugment(seed=1)(images, 5), TTAAugment(seed=1)(images, 5)
    assert torch.equal(a, b) and a.shape == (5 * 16, 3, 8, 8) and 0 <= a.min() and a.max() <= 1
    views = a.view(5, *images.shape)
    assert not torch.allclose(views[0], views[1])


def test_reset_returns_to_the_initial_state(tiny_model, images):
    s = strategies.create("tent", tiny_model, lr=1e-2)
    before = _state(s)
    s.adapt(images)
    assert _changed(before, _state(s))
    s.reset()
    assert not _changed(before, _state(s))


def test_unknown_strategy_and_hyperparameter():
    from ctta.errors import ConfigError, UnknownNameError

    with pytest.raises(UnknownNameError, match="did you mean 'cotta'|Did you mean 'cotta'"):
        strategies.create("cota", make_tiny())
    with pytest.raises(ConfigError, match="no hyperparameter 'learning_rate'"):
        strategies.create("tent", make_tiny(), learning_rate=1.0)


def test_finetune_learns_from_labelled_batches():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = (x[:, 0].mean(dim=(1, 2)) > x[:, 1].mean(dim=(1, 2))).long()
    x[:, 0] += y.view(-1, 1, 1) * 0.5
    s = strategies.create("finetune", make_tiny(num_classes=2), lr=0.05)
    acc0 = (s.predict(x).argmax(1) == y).float().mean()
    for _ in range(30):
        s.learn(x, y)
    assert (s.predict(x).argmax(1) == y).float().mean() > max(acc0, 0.9)


def test_strategies_on_a_timm_transformer():
    """No BatchNorm: TENT adapts the LayerNorm affines only, CoTTA still runs (views, EMA, restore)."""
    from ctta import backbones

    model = backbones.create("test_vit", num_classes=5)
    x = torch.rand(4, 3, *model.net.pretrained_cfg["input_size"][1:])
    before = _state(model)
    tent = strategies.create("tent", model, lr=1e-2)
    assert tent.adapt(x).shape == (4, 5)
    changed = _changed(before, _state(model))
    assert changed and all(".norm" in k or "norm1" in k or "norm2" in k or k.startswith("net.norm") for k in changed)
    cotta = strategies.create("cotta", backbones.create("test_vit", num_classes=5), views=2)
    assert cotta.adapt(x).shape == (4, 5)


def test_device_generator_is_kept_across_steps():
    """Restore masks must advance one generator, not restart a fresh one each step."""
    from ctta.seeding import same_device

    s = strategies.create("cotta", make_tiny(), views=2)
    g = s.generator(torch.device("cpu"))
    assert s.generator(torch.device("cpu")) is g
    assert same_device(torch.device("cpu"), torch.device("cpu:0"))
    assert not same_device(torch.device("cpu"), torch.device("meta"))


def test_a_fresh_strategy_resumes_the_same_random_draws(images):
    """CoTTA's restore masks and views come from generators: a checkpoint loaded into a new strategy continues them."""
    torch.manual_seed(0)
    model = make_tiny()
    a = strategies.create("cotta", copy.deepcopy(model), rst=0.5, ap=1.0, views=2, seed=3)
    a.adapt(images)
    saved = copy.deepcopy(a.checkpoint_state())
    a.adapt(images)
    b = strategies.create("cotta", copy.deepcopy(model), rst=0.5, ap=1.0, views=2, seed=3)
    b.load_checkpoint_state(saved)
    b.adapt(images)
    assert not _changed(_state(a), _state(b))
    c = strategies.create("cotta", copy.deepcopy(model), rst=0.5, ap=1.0, views=2, seed=3)
    c.load_checkpoint_state(saved)
    c._generator = None  # what happened before: the saved generator state was dropped for a fresh strategy
    c.adapt(images)
    assert _changed(_state(a), _state(c))
