"""Backbones: every registered net builds, checkpoints round-trip, each way a checkpoint fails is one clear error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ctta.backbones import BACKBONES, Classifier, create, list_backbones, load_checkpoint
from ctta.errors import CheckpointError, CttaError, UnknownNameError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RESNET20 = SHARED / "models" / "resnet20-12fca82f.th"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.npz"
SMALL = [n for n in list_backbones() if n != "wrn28_10_cifar"]  # WRN-28-10 is big: built once, below


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_prefixed(model: Classifier, path: Path) -> Path:
    """Save as DataParallel-trained checkpoints are: ``module.`` keys under ``state_dict``, plus metadata."""
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.net.state_dict().items()}, "best_prec1": 1.0}, path)
    return path


@pytest.mark.parametrize("name", SMALL)
def test_registered_backbones_give_logits(name):
    model = create(name, num_classes=7)
    assert isinstance(model, Classifier) and model.num_classes == 7 and model.name == name
    with torch.no_grad():
        assert model(torch.rand(3, 3, 32, 32)).shape == (3, 7)


def test_normalisation_stays_out_of_the_state_dict():
    model = create("resnet20_cifar")
    assert all(k.startswith("net.") for k in model.state_dict())
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_resnet20_parameter_count():
    assert abs(n_params(create("resnet20_cifar")) - 0.27e6) < 0.005e6


def test_wrn28_10_parameter_count_logits_and_layout():
    model = create("wrn28_10_cifar")
    assert abs(n_params(model) - 36.5e6) < 0.1e6
    keys = model.net.state_dict()
    assert {"conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.3.bn2.running_var", "bn1.weight",
            "fc.bias"} <= set(keys)
    assert "block1.layer.1.convShortcut.weight" not in keys
    assert float(model.normalize.std.min()) == 1.0
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_wrn_depth_and_width_options():
    model = create("wrn28_10_cifar", depth=16, widen_factor=1)
    assert model.net.fc.in_features == 64 and len(model.net.block1.layer) == 2


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    source = create("resnet20_cifar")
    for m in source.modules():  # non-trivial BN statistics, as a trained model has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = save_prefixed(source, tmp_path / "r20.th")
    loaded = create("resnet20_cifar", weights=path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


def test_whole_classifier_state_dict_loads(tmp_path):
    source = create("tiny_cnn")
    torch.save(source.state_dict(), tmp_path / "c.pt")
    loaded = load_checkpoint(create("tiny_cnn"), tmp_path / "c.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))


def test_checkpoint_with_objects_falls_back_to_full_unpickling(tmp_path, caplog):
    import argparse

    source = create("tiny_cnn")
    torch.save({"net": source.net.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pt")
    with caplog.at_level("WARNING", logger="ctta.backbones.checkpoint"):
        loaded = create("tiny_cnn", weights=tmp_path / "ns.pt")
    assert "argparse.Namespace" in caplog.text and "trust" in caplog.text
    assert torch.equal(loaded.net.fc.weight, source.net.fc.weight)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = create("resnet20_cifar").net.state_dict()
    state["linear.extra"] = state.pop("linear.weight")
    torch.save({"state_dict": state}, tmp_path / "bad.th")
    with pytest.raises(CheckpointError) as e:
        create("resnet20_cifar", weights=tmp_path / "bad.th")
    msg = str(e.value)
    assert "linear.weight" in msg and "linear.extra" in msg and "bad.th" in msg and "resnet20_cifar" in msg


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    path = save_prefixed(create("resnet20_cifar", num_classes=100), tmp_path / "c100.th")
    with pytest.raises(CheckpointError) as e:
        create("resnet20_cifar", num_classes=10, weights=path)
    assert "linear.weight: checkpoint (100, 64) vs model (10, 64)" in str(e.value)


def test_missing_file_and_garbage_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        create("tiny_cnn", weights=tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        create("tiny_cnn", weights=tmp_path / "junk.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        create("tiny_cnn", weights=tmp_path / "meta.pt")


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownNameError) as e:
        create("resnet20_cifr")
    msg = str(e.value)
    assert "resnet20_cifar" in msg and "Did you mean" in msg and "timm" in msg
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet50'"):
        create("resnt50")


def test_bad_option_is_a_config_error():
    with pytest.raises(CttaError, match="colour"):
        create("tiny_cnn", colour="red")


def test_timm_model_builds_and_loads_a_checkpoint(tmp_path):
    model = create("test_resnet", num_classes=7)
    assert model.num_classes == 7 and model.normalize.mean.numel() == 3
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    path = save_prefixed(model, tmp_path / "timm.pt")
    loaded = create("test_resnet", num_classes=7, weights=path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_timm_pretrained_offline_says_use_weights(monkeypatch):
    import timm

    def offline(*args, pretrained=False, **kwargs):
        raise OSError("cannot reach huggingface.co")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CttaError, match="--weights PATH"):
        create("test_resnet", pretrained=True)


def test_registry_lists_the_builtins():
    assert {"resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar", "wrn28_10_cifar",
            "tiny_cnn"} <= set(BACKBONES.names())
    assert BACKBONES.describe("resnet20_cifar")


@pytest.mark.skipif(not RESNET20.is_file(), reason="shared ResNet-20 checkpoint not present")
def test_shared_resnet20_checkpoint_loads():
    model = create("resnet20_cifar", weights=RESNET20)
    assert model.net.linear.out_features == 10


@pytest.mark.skipif(not (RESNET20.is_file() and CIFAR_TEST.is_file()), reason="shared checkpoint or CIFAR-10 absent")
def test_shared_resnet20_accuracy_on_cifar10():
    # 500 images, 50 per class: test.npz is ordered by class, so the first 500 would all be airplanes
    with np.load(CIFAR_TEST) as d:
        images, labels = d["images"][::20][:500], d["labels"][::20][:500]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    model = create("resnet20_cifar", weights=RESNET20)
    with torch.no_grad():
        acc = (model(x).argmax(1) == torch.from_numpy(labels).long()).float().mean().item()
    assert acc > 0.70


@pytest.mark.parametrize("name", SMALL + ["test_vit"])
def test_feature_api_gives_penultimate_features_and_the_same_logits(name):
    """Classifier.forward_features -> N x D pooled features; forward_head of them == forward (LAME, LSA use this)."""
    model = create(name, num_classes=6)
    size = model.net.pretrained_cfg["input_size"][1:] if hasattr(model.net, "pretrained_cfg") else (32, 32)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        feats, logits = model.features_and_logits(x)
        assert feats.shape == (2, model.feature_dim)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), logits)


def test_feature_api_on_bare_modules_and_a_clear_error_without_it():
    from ctta.backbones.classifier import features_and_logits

    from conftest import make_tiny

    tiny = make_tiny()
    x = torch.rand(2, 3, 8, 8)
    feats, logits = features_and_logits(tiny, x)
    assert feats.shape == (2, 8)
    torch.testing.assert_close(logits, tiny(x))
    with pytest.raises(CttaError, match="exposes no penultimate features"):
        features_and_logits(torch.nn.Linear(3, 2), torch.rand(2, 3))
    bare = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), (0.5,), (0.5,), 2)
    with pytest.raises(CttaError, match="exposes no penultimate features"):
        bare.forward_features(torch.rand(1, 3, 2, 2))


@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet18_reduced", "tiny_cnn", "small_wrn"])
def test_feature_map_pools_to_the_penultimate_features(name):
    """forward_feature_map -> N x C x H x W; forward_features is exactly its global average pool (Mamba-FSCIL's map
    tokens and the pooled-feature strategies see the same features)."""
    import torch.nn.functional as F

    from ctta.backbones.classifier import feature_map, has_feature_map
    from ctta.backbones.wideresnet import WideResNet

    model = Classifier(WideResNet(10, 1, 6), (0.0,), (1.0,), 6) if name == "small_wrn" else create(name, num_classes=6)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        fmap = feature_map(model, x)
        feats = model.forward_features(x)
    assert has_feature_map(model) and fmap.dim() == 4 and fmap.shape[:2] == (2, model.feature_dim)
    assert torch.equal(torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1), feats)
    torch.testing.assert_close(fmap.mean(dim=(2, 3)), feats)


@pytest.mark.parametrize("name", ["test_convnext", "test_vit"])
def test_feature_map_of_timm_models(name):
    """timm CNNs: timm's forward_features map; timm ViTs: the patch tokens laid out on the patch grid."""
    from ctta.backbones.classifier import feature_map

    model = create(name, num_classes=3)
    x = torch.rand(2, 3, *model.net.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        fmap = feature_map(model, x)
        ref = model.net.forward_features(model.normalize(x))
    assert fmap.dim() == 4 and fmap.shape[:2] == (2, model.feature_dim)
    if ref.dim() == 3:  # ViT: prefix tokens dropped, patch tokens row-major on the grid
        k = model.net.num_prefix_tokens
        torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), ref[:, k:])
    else:
        torch.testing.assert_close(fmap, ref)


def test_feature_map_clear_error_without_one():
    from ctta.backbones.classifier import feature_map, has_feature_map

    from conftest import make_tiny

    bare = Classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), (0.5,), (0.5,), 2)
    assert not bare.has_feature_map and not has_feature_map(make_tiny())
    with pytest.raises(CttaError, match="exposes no feature map"):
        feature_map(bare, torch.rand(1, 3, 2, 2))
    with pytest.raises(CttaError, match="exposes no feature map"):
        feature_map(make_tiny(), torch.rand(1, 3, 8, 8))


def test_fixed_input_timm_models_resize_their_input_and_cnns_take_any_size():
    """A ViT's pretrained config fixes its input (224 / 384 px); images of another size are resized to it first."""
    import torch.nn.functional as F

    from ctta.backbones import create

    torch.manual_seed(0)
    vit = create("vit_tiny_patch16_224", num_classes=10)
    assert vit.normalize.size == (224, 224)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        up = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        assert torch.allclose(vit(x), vit(up), atol=1e-6)
    cnn = create("resnet18", num_classes=10)  # timm CNNs: no fixed size, nothing resized
    assert cnn.normalize.size is None
    small = create("vit_tiny_patch16_224", num_classes=10, img_size=32)  # built for 32 px: fed 32 px as it is
    assert small.normalize.size == (32, 32)
    with torch.no_grad():
        assert small(torch.rand(2, 3, 32, 32)).shape == (2, 10)
