"""CLIP backbone and CLIP-based strategies: the zero-shot head is CLIP's formula, pretrained weights offline are a
one-line error, clip_zeroshot changes nothing, and ViLAaD's frozen teacher stays bit-identical through a run."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

import ctta  # noqa: E402
from conftest import make_tiny  # noqa: E402
from ctta.backbones import create as create_backbone  # noqa: E402
from ctta.backbones.clip import CLIPZeroShot, build_open_clip  # noqa: E402
from ctta.errors import CheckpointError, ConfigError, UnsupportedError  # noqa: E402
from ctta.streams import create as make_stream  # noqa: E402
from ctta.strategies import create  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_zero_shot_head_is_normalised_image_times_normalised_text_times_logit_scale():
    torch.manual_seed(0)
    clip_model, tokenizer = build_open_clip("tiny")
    reference = copy.deepcopy(clip_model).eval()
    templates = ["a photo of a {}.", "a picture of the {}."]
    net = CLIPZeroShot(clip_model, tokenizer, ["cat", "dog", "ship"], templates).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        img = F.normalize(reference.encode_image(x), dim=-1)
        text = torch.stack([F.normalize(F.normalize(reference.encode_text(tokenizer([t.format(c) for t in templates])),
                                                    dim=-1).mean(0), dim=0) for c in ["cat", "dog", "ship"]])
        expected = reference.logit_scale.exp() * img @ text.t()
        assert torch.allclose(net(x), expected, atol=1e-5)
        assert torch.allclose(net.forward_head(net.forward_features(x)), net(x))


def test_registered_tiny_clip_is_a_classifier_with_the_feature_api():
    model = create_backbone("clip_tiny", num_classes=10, class_names="digits")
    assert model.net.class_names == NAMES and model.feature_dim == 32
    x = torch.rand(2, 3, 16, 16)  # resized to the encoder's 32 x 32 inside
    with torch.no_grad():
        f, logits = model.features_and_logits(x)
        assert f.shape == (2, 32) and torch.allclose(logits, model(x))
    with pytest.raises(ConfigError, match="3 class names for num_classes=10"):
        create_backbone("clip_tiny", num_classes=10, class_names=["a", "b", "c"])
    with pytest.raises(ConfigError, match="class_names must be"):
        create_backbone("clip_tiny", class_names="imagenet-22k")


def test_pretrained_weights_offline_are_a_one_line_error(monkeypatch):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known\nsecond line of a long trace")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", offline, raising=False)
    with pytest.raises(CheckpointError) as err:
        create_backbone("clip", num_classes=10, model="ViT-B-32", pretrained_tag="openai")
    assert "\n" not in str(err.value) and "ViT-B-32/openai" in str(err.value) and "internet" in str(err.value)
    with pytest.raises(ConfigError, match="no pretrained tag 'nonsense'"):
        create_backbone("clip", num_classes=10, model="ViT-B-32", pretrained_tag="nonsense")
    with pytest.raises(ConfigError, match="Did you mean 'ViT-B-32'"):
        create_backbone("clip", num_classes=10, model="ViT-B-33")


def test_clip_zeroshot_predicts_with_the_head_and_changes_nothing():
    model = create_backbone("clip_tiny", num_classes=10, class_names="digits")
    before = copy.deepcopy(model.state_dict())
    st = create("clip_zeroshot", model)
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(st.adapt(x), expected) and torch.equal(st.predict(x), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UnsupportedError, match="needs a CLIP backbone"):
        create("clip_zeroshot", make_tiny())


def test_clip_zeroshot_on_a_class_incremental_stream_masks_unseen_classes_and_learns_nothing():
    model = create_backbone("clip_tiny", num_classes=4, class_names=["a", "b", "c", "d"])
    before = copy.deepcopy(model.state_dict())
    st = create("clip_zeroshot", model)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
    out = st.learn(x, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert torch.isinf(out[:, 2:]).all() and torch.equal(out[:, :2], full[:, :2])
    st.learn(x, torch.tensor([2, 2, 3, 3, 2, 3]))
    assert torch.equal(st.predict(x), full)  # all four seen: the plain zero-shot head
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _vilaad(seed: int = 0, **kw):
    teacher = create_backbone("clip_tiny", num_classes=10, class_names="digits")
    return create("vilaad", make_tiny(seed=seed, num_classes=10), teacher=teacher, max_iter=6, **kw), teacher


def test_vilaad_teacher_stays_frozen_and_out_of_the_state_dict():
    st, teacher = _vilaad()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = {k: v.clone() for k, v in st.model.state_dict().items()}
    st.train()
    assert not teacher.training
    for _ in range(3):
        st.adapt(torch.rand(16, 3, 16, 16))
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())
    assert not any(k.startswith("teacher") or "visual" in k for k in st.state_dict())
    assert not all(torch.equal(student[k], v) for k, v in st.model.state_dict().items())  # the student did move
    assert st.bank.table("vil").shape[1] == 10


def test_vilaad_targets_are_the_teacher_predictions_of_neighbours_and_self():
    for include_self, width in ((True, 4), (False, 3)):
        st, teacher = _vilaad(include_self=include_self, k=3)
        x = torch.rand(8, 3, 16, 16)
        slot = st.bank.slots(x)
        st.bank.write("features", slot, F.normalize(torch.rand(8, 5), dim=1))
        index, mask = st.bank.neighbours(st.bank.table("features")[slot], slot, 3)
        targets, mask = st.attraction_targets(x, slot, index, mask)
        with torch.no_grad():
            q = teacher(x).softmax(1)
        assert targets.shape == (8, width, 10) and mask.shape == (8, width)
        assert torch.allclose(targets[:, -1], q[index[:, -1]], atol=1e-6)
        if include_self:
            assert torch.allclose(targets[:, 0], q, atol=1e-6)


def test_vilaad_two_epoch_sfda_run_is_deterministic():
    stream = make_stream("sfda", num_samples=64, epochs=2, batch_size=32)
    results = []
    for _ in range(2):
        st, _ = _vilaad(seed=1)
        results.append(ctta.run(stream, st, device="cpu", progress=False))
    assert list(results[0].segments["segment"]) == ["target/epoch-0", "target/epoch-1", "target/eval"]
    assert results[0].steps.equals(results[1].steps)
    with pytest.raises(ConfigError, match="needs a ViL teacher"):
        create("vilaad", make_tiny(num_classes=10), teacher=None)


def _save_open_clip(path, clip_model, config):
    torch.save({"format": "ctta-open-clip", "config": config, "state_dict": clip_model.state_dict()}, path)


def test_clip_backbone_loads_a_local_open_clip_checkpoint_with_its_config(tmp_path):
    from ctta.backbones.clip import TINY_CONFIG

    torch.manual_seed(3)
    clip_model, tokenizer = build_open_clip("tiny")
    path = tmp_path / "inhouse.pt"
    _save_open_clip(path, clip_model, TINY_CONFIG)
    reference = CLIPZeroShot(copy.deepcopy(clip_model), tokenizer, NAMES, ["a photo of a {}.", "a {}."]).eval()
    model = create_backbone("clip", num_classes=10, checkpoint=str(path), class_names="digits",
                            templates=["a photo of a {}.", "a {}."])
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():  # same weights, same head: the wrapper's logits on CLIP-normalised input
        assert torch.allclose(model.net(x), reference(x), atol=1e-5)
    # and as ViLAaD's teacher, by backbone arguments
    st = create("vilaad", make_tiny(num_classes=10), teacher={"name": "clip", "checkpoint": str(path),
                                                             "class_names": "digits"}, max_iter=2)
    assert torch.allclose(st.teacher.net.text_features, create_backbone(
        "clip", num_classes=10, checkpoint=str(path), class_names="digits").net.text_features)


def test_bad_open_clip_checkpoints_are_one_line_errors(tmp_path, caplog):
    from ctta.backbones.clip import TINY_CONFIG

    clip_model, _ = build_open_clip("tiny")
    with pytest.raises(CheckpointError, match="does not exist"):
        create_backbone("clip", num_classes=10, checkpoint=str(tmp_path / "nope.pt"), class_names="cifar10")
    plain = tmp_path / "plain.pt"
    torch.save(clip_model.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not a 'ctta-open-clip' file"):
        create_backbone("clip", num_classes=10, checkpoint=str(plain), class_names="cifar10")
    other = dict(TINY_CONFIG, embed_dim=16)
    wrong = tmp_path / "wrong.pt"
    _save_open_clip(wrong, clip_model, other)
    with pytest.raises(CheckpointError, match="does not match its config"):
        create_backbone("clip", num_classes=10, checkpoint=str(wrong), class_names="cifar10")
    good = tmp_path / "good.pt"
    _save_open_clip(good, clip_model, TINY_CONFIG)
    with caplog.at_level("WARNING", logger="ctta.backbones.clip"):  # e.g. the vilaad YAML's defaults merged in
        model = create_backbone("clip", num_classes=10, checkpoint=str(good), model="ViT-B-32",
                                pretrained_tag="openai", class_names="cifar10")
    assert model.feature_dim == TINY_CONFIG["embed_dim"] and "ignoring model='ViT-B-32'" in caplog.text
