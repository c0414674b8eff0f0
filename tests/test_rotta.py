"""RoTTA (``rotta``): the CSTU memory's capacity, class balance and replacement rule by hand, RBN's EMA statistics,
what it updates, the teacher's EMA, one update against a hand-written one, the strong view's draws, reset and
determinism."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision.transforms.functional as TF
from torch import nn

from conftest import make_tiny
from ctta import strategies
from ctta.strategies.common.augment import AugmentConfig, TTAAugment
from ctta.strategies.common.balanced_memory import CategoryBalancedMemory, timeliness_weights
from ctta.strategies.common.robust_bn import use_robust_batchnorm_

pytestmark = pytest.mark.usefixtures("one_thread")


def _img(v: float) -> torch.Tensor:
    return torch.full((3, 2, 2), v)


def _score(age: int, u: float, capacity: int, classes: int) -> float:
    return 1 / (1 + math.exp(-age / capacity)) + u / math.log(classes)


def test_memory_never_exceeds_its_capacity_and_caps_every_class():
    g = torch.Generator().manual_seed(0)
    mem = CategoryBalancedMemory(capacity=10, num_classes=4)  # capacity / C = 2.5: at most 3 per class
    labels = [0] * 100 + torch.multinomial(torch.tensor([0.7, 0.1, 0.1, 0.1]), 300, True, generator=g).tolist()
    for k, y in enumerate(labels):
        mem.add(_img(k), y, float(torch.rand(1, generator=g)))
        assert mem.occupancy() <= 10 and max(mem.per_class_counts()) <= 3
        if k == 99:  # 100 samples of class 0 alone: it keeps 3, the rest of the bank stays free for other classes
            assert mem.per_class_counts() == [3, 0, 0, 0]
    assert mem.occupancy() == 10 and min(mem.per_class_counts()) >= 2, "the 70 % class does not crowd out the others"
    images, ages = mem.get()
    assert images.shape == (10, 3, 2, 2) and ages.shape == (10,)
    slots = {float(i[0, 0, 0]) for i in images}
    assert len(slots) == 10, "every stored image is a different sample"


def test_replacement_picks_the_highest_score_and_drops_a_new_item_that_scores_more():
    mem = CategoryBalancedMemory(capacity=4, num_classes=2)  # 2 per class
    for v, (y, u) in enumerate([(0, 0.1), (0, 0.6), (1, 0.2), (1, 0.3)]):
        assert mem.add(_img(v), y, u)
    # class 0 is full: its items score S(4, 0.1) = 0.875 (old, certain) and S(3, 0.6) = 1.545 (uncertain); the new
    # item S(0, 0.5) = 1.221 replaces the uncertain one, not the oldest
    assert _score(3, 0.6, 4, 2) > _score(0, 0.5, 4, 2) > _score(4, 0.1, 4, 2)
    assert mem.add(_img(4), 0, 0.5)
    assert [u for _, u, _ in mem.entries[0]] == [0.1, 0.5] and mem.per_class_counts() == [2, 2]
    # class 1: S(3, 0.2) = 0.968, S(2, 0.3) = 1.055, both below the new S(0, 0.9) = 1.798: the new item is dropped
    assert max(_score(3, 0.2, 4, 2), _score(2, 0.3, 4, 2)) < _score(0, 0.9, 4, 2)
    assert not mem.add(_img(5), 1, 0.9)
    assert [u for _, u, _ in mem.entries[1]] == [0.2, 0.3]
    images, ages = mem.get()  # class-major, insertion order; every attempt aged every item, the dropped one too
    assert [float(i[0, 0, 0]) for i in images] == [0.0, 4.0, 2.0, 3.0]
    torch.testing.assert_close(ages, torch.tensor([6, 2, 4, 3]) / 4.0)
    torch.testing.assert_close(timeliness_weights(ages), torch.sigmoid(-ages))


def test_a_class_below_its_share_takes_the_place_of_a_majority_class_item():
    mem = CategoryBalancedMemory(capacity=5, num_classes=2)  # 2.5 per class: a class may hold 3 while there is room
    for v in range(3):
        mem.add(_img(v), 0, 0.3)
    mem.add(_img(3), 1, 0.3)
    mem.add(_img(4), 1, 0.3)
    assert mem.per_class_counts() == [3, 2] and mem.occupancy() == 5
    assert mem.add(_img(5), 1, 0.3)  # class 1 below 2.5, bank full: the majority class 0 gives up its oldest item
    assert mem.per_class_counts() == [2, 3]
    assert [float(i[0, 0, 0]) for i in mem.get()[0]] == [1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("kind", ["2d", "1d"])
def test_rbn_statistics_follow_the_ema_formula_and_eval_reads_them(kind):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3) if kind == "2d" else nn.BatchNorm1d(3)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    keys = set(bn.state_dict())
    model = nn.Sequential(bn)
    use_robust_batchnorm_(model, 0.05)
    assert set(bn.state_dict()) == keys and isinstance(bn, nn.BatchNorm2d if kind == "2d" else nn.BatchNorm1d)
    x = torch.randn(8, 3, 4, 4) * 2 + 1 if kind == "2d" else torch.randn(8, 3) * 2 + 1
    dims = (0, 2, 3) if kind == "2d" else (0,)
    shape = (1, 3, 1, 1) if kind == "2d" else (1, 3)
    mu_s, var_s = bn.running_mean.clone(), bn.running_var.clone()
    mu = 0.95 * mu_s + 0.05 * x.mean(dims)
    var = 0.95 * var_s + 0.05 * x.var(dims, unbiased=False)
    bn.train()
    out = bn(x)
    torch.testing.assert_close(bn.running_mean, mu)
    torch.testing.assert_close(bn.running_var, var)
    expected = (x - mu.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) \
        + bn.bias.view(shape)
    torch.testing.assert_close(out, expected)
    bn.eval()
    before = (bn.running_mean.clone(), bn.running_var.clone())
    out_eval = bn(x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    torch.testing.assert_close(out_eval, expected)


def _norm_keys(model: nn.Module):
    return {k for k in model.state_dict() if k.startswith("bn") and not k.endswith("num_batches_tracked")}


def test_rotta_updates_only_the_student_norms_and_the_teacher_is_its_ema(images):
    s = strategies.create("rotta", make_tiny(), memory_size=16, update_frequency=16, lr=0.05)
    student0 = {k: v.clone() for k, v in s.model.state_dict().items()}
    teacher0 = copy.deepcopy(s.teacher)
    expected_out = teacher0.eval()(images)
    out = s.adapt(images)  # 16 samples: one update, after the last one
    assert torch.equal(out, expected_out), "the output is the teacher's prediction before the update"
    assert s.updates == 1
    changed = {k for k, v in s.model.state_dict().items() if not torch.equal(v, student0[k])}
    assert changed == _norm_keys(s.model), "student: norm affines and RBN statistics only"
    assert {n for n, p in s.model.named_parameters() if p.requires_grad} == \
        {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    m = 1 - 0.001
    for (name, t), t0, p in zip(s.teacher.named_parameters(), teacher0.parameters(), s.model.parameters()):
        assert torch.equal(t, m * t0 + (1 - m) * p), name
    # the teacher's RBN statistics come from its own forward on the memory (before its EMA), not from the student
    memory_images, _ = s.memory.get()
    teacher0.train()(memory_images)
    for bn, bn0, sbn in ((s.teacher.bn1, teacher0.bn1, s.model.bn1), (s.teacher.bn2, teacher0.bn2, s.model.bn2)):
        assert torch.equal(bn.running_mean, bn0.running_mean) and torch.equal(bn.running_var, bn0.running_var)
        assert not torch.equal(bn.running_mean, sbn.running_mean)


def test_one_update_equals_the_hand_written_time_reweighted_mean_teacher_step(images):
    s = strategies.create("rotta", make_tiny(), memory_size=16, update_frequency=16, lr=0.05, seed=3)
    student, teacher = copy.deepcopy(s.model), copy.deepcopy(s.teacher)
    params = [student.bn1.weight, student.bn1.bias, student.bn2.weight, student.bn2.bias]
    opt = torch.optim.Adam(params, lr=0.05, betas=(0.9, 0.999))
    s.adapt(images)
    memory_images, ages = s.memory.get()  # the memory at the update (it came after the batch's last sample)
    student.train(), teacher.train()
    strong = TTAAugment(AugmentConfig(), seed=3, draw_order="torchvision")(memory_images, 1)
    with torch.no_grad():
        t = teacher(memory_images)
    w = torch.exp(-ages) / (1 + torch.exp(-ages))
    (-(t.softmax(1) * student(strong).log_softmax(1)).sum(1) * w).mean().backward()
    opt.step()
    for name, p in s.model.named_parameters():
        assert torch.equal(p, dict(student.named_parameters())[name]), name


def test_updates_come_every_update_frequency_samples_across_batches(images):
    s = strategies.create("rotta", make_tiny(), memory_size=8, update_frequency=16)
    for k, expected in enumerate([0, 1, 1, 2, 3]):  # 10 samples per batch: after 10, 20, 30, 40, 50 samples
        s.adapt(images[:10])
        assert s.updates == expected, k
    assert s.seen == 50 and s.memory.occupancy() <= 8


def test_the_strong_view_draws_like_torchvision_and_matches_its_ops():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    aug = TTAAugment(AugmentConfig(), seed=7, draw_order="torchvision")
    p = aug.sample(1, tuple(x.shape))
    torch.manual_seed(7)  # the reference's draws from torch's global generator, in its pipeline's order
    order = torch.randperm(5).tolist()
    ranges = [(0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3)]
    factors = {op: torch.tensor(1.0).uniform_(*ranges[op]).item() for op in order}
    angle = torch.empty(1).uniform_(-15.0, 15.0).item()
    dx, dy = (int(round(torch.empty(1).uniform_(-4.0, 4.0).item())) for _ in range(2))
    scale = torch.empty(1).uniform_(0.9, 1.1).item()
    sigma = torch.empty(1).uniform_(0.001, 0.5).item()
    flip = bool(torch.rand(1) < 0.5)
    noise = torch.randn(x.shape)
    assert p.orders == [order] and p.colour == [[factors[k] for k in range(5)]]
    assert p.values[0].tolist() == [angle, scale, dx, dy, sigma] and bool(p.geometry[0, 6] < 0.5) == flip
    assert torch.equal(p.noise[0], noise)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue,
           lambda im, f: TF.adjust_gamma(im.clamp(1e-8, 1.0), f)]
    ref = x
    for op in order:
        ref = ops[op](ref, factors[op])
    ref = TF.affine(TF.pad(ref, 16, padding_mode="edge"), angle=angle, translate=[dx, dy], scale=scale,
                    shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR, fill=0)
    ref = TF.center_crop(TF.gaussian_blur(ref, 5, [sigma, sigma]), 32)
    ref = ((TF.hflip(ref) if flip else ref) + noise * 0.005).clamp(0, 1)
    torch.testing.assert_close(aug.apply(x, p, 0, 1), ref, atol=1e-5, rtol=0)


def test_rotta_reset_determinism_and_seed(images):
    a = strategies.create("rotta", make_tiny(), memory_size=8, update_frequency=8, lr=0.05)
    b = strategies.create("rotta", make_tiny(), memory_size=8, update_frequency=8, lr=0.05)
    outs_a = [a.adapt(images) for _ in range(3)]
    outs_b = [b.adapt(images) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(outs_a, outs_b))
    assert not torch.equal(outs_a[0], outs_a[2])
    a.reset()
    assert a.memory.occupancy() == 0 and a.seen == 0 and a.updates == 0 and not a.optimizer.state
    assert a.memory.images.numel() == 0
    assert [torch.equal(a.adapt(images), o) for o in outs_a] == [True, True, True]
    c = strategies.create("rotta", make_tiny(), memory_size=8, update_frequency=8, lr=0.05, seed=5)
    outs_c = [c.adapt(images) for _ in range(3)]
    assert torch.equal(outs_c[0], outs_a[0]), "nothing random before the first update"
    assert not torch.equal(outs_c[2], outs_a[2]), "the strong view follows the seed"


def test_rotta_checkpoint_resumes_the_memory_and_the_draws(images):
    a = strategies.create("rotta", make_tiny(), memory_size=8, update_frequency=8, lr=0.05)
    a.adapt(images)
    state = copy.deepcopy(a.checkpoint_state())
    counts = a.memory.per_class_counts()
    after = [a.adapt(images) for _ in range(2)]
    b = strategies.create("rotta", make_tiny(), memory_size=8, update_frequency=8, lr=0.05)
    b.load_checkpoint_state(state)
    assert b.seen == 16 and b.updates == 2 and b.memory.per_class_counts() == counts
    assert [torch.equal(b.adapt(images), o) for o in after] == [True, True]


def test_rotta_on_a_transformer_adapts_its_layernorm_affines():
    from ctta import backbones

    model = backbones.create("test_vit", num_classes=5)
    x = torch.rand(4, 3, *model.net.pretrained_cfg["input_size"][1:])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = strategies.create("rotta", model, memory_size=4, update_frequency=4, lr=1e-2)
    assert not s.rbn_layers and s.adapt(x).shape == (4, 5) and s.updates == 1
    changed = {k for k, v in s.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("norm" in k for k in changed)


def test_rotta_resumes_through_the_engine(tmp_path):
    import ctta
    from ctta.streams import Stream, tensor_segment

    from conftest import interrupt_at

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 3, 8, 8, generator=g), torch.arange(24) % 4
    segs = [tensor_segment(f"d{d}", "adapt", (x * (0.5 + 0.2 * d)).clamp(0, 1), y, 8) for d in range(3)]

    def stream():
        return Stream(name="toy", segments=segs, num_classes=4, spec={"name": "toy"})

    def make():
        return strategies.create("rotta", make_tiny(), memory_size=8, update_frequency=8, lr=0.05, seed=1)

    full = ctta.run(stream(), make(), device="cpu", out=tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        ctta.run(stream(), interrupt_at(make(), 4), device="cpu", out=tmp_path / "cut", progress=False)
    resumed = ctta.run(stream(), make(), device="cpu", out=tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps["correct"].tolist() == full.steps["correct"].tolist()
