"""The registry and every registered model: shape, finiteness, gradients; seed_cnn against the notebook's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar_cnn.errors import CifarCnnError
from cifar_cnn.models import create_model, list_models, model_info, register_model


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    size = model_info(name).input_size
    x = torch.randn(4, 3, size, size)
    out = model(x)
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_eval_mode_is_deterministic(name: str) -> None:
    model = create_model(name).eval()
    size = model_info(name).input_size
    x = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        assert torch.equal(model(x), model(x))


def test_seed_cnn_is_the_notebook_network() -> None:
    m = create_model("seed_cnn")
    # hand count: conv1 3*16*9+16, conv2 16*32*9+32, fc1 2048*512+512, fc2 512*10+10
    assert sum(p.numel() for p in m.parameters()) == 448 + 4640 + 1049088 + 5130
    assert (m.conv1.kernel_size, m.conv1.padding, m.conv2.out_channels) == ((3, 3), (1, 1), 32)
    assert m.dropout.p == 0.25 and create_model("seed_cnn", dropout=0.5).dropout.p == 0.5
    # the same computation written out with plain torch.nn.functional (eval mode: dropout is the identity)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    F = torch.nn.functional
    h = F.max_pool2d(F.relu(F.conv2d(x, m.conv1.weight, m.conv1.bias, padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, m.conv2.weight, m.conv2.bias, padding=1)), 2)
    h = F.relu(F.linear(h.reshape(2, -1), m.fc1.weight, m.fc1.bias))
    ref = F.linear(h, m.fc2.weight, m.fc2.bias)
    with torch.inference_mode():
        assert torch.allclose(m(x), ref, atol=1e-6)


def test_registry_refuses_duplicates_and_unknowns() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("seed_cnn")(lambda num_classes=10: nn.Linear(1, num_classes))
    with pytest.raises(CifarCnnError, match="unknown model 'nope'.*seed_cnn"):
        create_model("nope")
    with pytest.raises(CifarCnnError, match="takes no argument width"):
        create_model("seed_cnn", width=3)
    with pytest.raises(CifarCnnError, match="dropout"):
        create_model("seed_cnn", dropout=1.5)


def test_resnet18_reference_shape_and_size() -> None:
    m = create_model("resnet18")
    # the standard CIFAR ResNet-18 has 11,173,962 parameters for 10 classes
    assert sum(p.numel() for p in m.parameters()) == 11_173_962
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    # zero-initialised last BN: at init every residual block is the identity on its shortcut path
    block = m.layers[0]
    with torch.no_grad():
        h = torch.relu(torch.randn(2, 64, 8, 8))
        assert torch.allclose(block.eval()(h), h)
