"""ctta.backbones.peft: freezing and parameter-efficient modules through one injection mechanism."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny
from ctta.backbones import create
from ctta.backbones.peft import (FiLM, LoRALinear, add_adapter, add_film, add_lora, count_trainable, freeze,
                                 head_parameter_names, peft_parameters)
from ctta.errors import ConfigError, UnsupportedError


def _vit():
    """A tiny randomly initialised timm ViT (2 blocks, width 32) for 32x32 images."""
    torch.manual_seed(0)
    return create("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=2, embed_dim=32,
                  num_heads=2)


def _state(m: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_film_adds_two_parameters_per_channel_of_each_norm_layer_and_starts_as_identity():
    for model, x in ((make_tiny(), torch.rand(4, 3, 8, 8)), (_vit(), torch.rand(2, 3, 32, 32))):
        norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]
        channels = [m.num_features if isinstance(m, nn.BatchNorm2d) else m.normalized_shape[0] for m in norms]
        before = model(x)
        films = add_film(model)
        assert len(films) == len(norms) and all(isinstance(f, FiLM) for f in films)
        assert torch.equal(model(x), before)  # scale 1, shift 0
        trainable = freeze(model, peft=True)
        assert count_trainable(model) == sum(2 * c for c in channels)
        assert all(n.endswith((".scale", ".shift")) for n in trainable)


def test_film_twice_does_not_nest():
    model = make_tiny()
    add_film(model)
    with pytest.raises(UnsupportedError, match="no norm layer"):
        add_film(model)


def test_lora_adds_r_times_in_plus_out_per_matrix_and_trains_only_its_factors():
    model = _vit()
    x = torch.rand(2, 3, 32, 32)
    before_out = model(x)
    before = _state(model)
    loras = add_lora(model, r=4, alpha=8, select="*.attn.qkv")
    assert len(loras) == 2 and all(isinstance(m, LoRALinear) for m in loras)
    assert torch.equal(model(x), before_out)  # B = 0 at start
    freeze(model, peft=True)
    assert count_trainable(model) == sum(4 * (m.base.in_features + m.base.out_features) for m in loras) == 2 * 4 * (32 + 96)
    opt = torch.optim.SGD(peft_parameters(model), lr=0.5)
    model(x).square().mean().backward()
    opt.step()
    assert not torch.allclose(model(x), before_out)
    after = {k.replace(".base.", "."): v for k, v in _state(model).items() if "lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # base untouched
    # the update equals merging the low-rank delta into the weight
    m = loras[0]
    z = torch.randn(3, m.base.in_features)
    assert torch.allclose(m(z), z @ (m.base.weight + m.delta_weight()).T + m.base.bias, atol=1e-5)


def test_freeze_with_patterns_and_head_names():
    model = make_tiny()
    names = freeze(model, except_=head_parameter_names(model))
    assert names == ["fc.weight", "fc.bias"] and count_trainable(model) == 8 * 4 + 4
    with pytest.raises(ConfigError, match="no parameter matches"):
        freeze(model, except_="nothing.*")
    assert freeze(model) == [] and count_trainable(model) == 0


def test_adapter_starts_as_identity_and_counts():
    model = _vit()
    x = torch.rand(2, 3, 32, 32)
    before = model(x)
    adapters = add_adapter(model, "*.mlp", dim=32, bottleneck=4)
    assert len(adapters) == 2 and torch.equal(model(x), before)
    freeze(model, peft=True)
    assert count_trainable(model) == 2 * (32 * 4 + 4 + 4 * 32 + 32)
