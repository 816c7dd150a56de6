"""The deconvnet on networks whose nonlinearities are not ReLU modules (PReLU, LeakyReLU, ELU,
GELU as a function, SiLU): the paper's rule (rectify the signal at every nonlinearity) against a
hand-built reference, and the Captum-compatible choice against Captum."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import NeuronDeconvolution
from helpers import assert_unchanged, snapshot
from torch import nn

import vizcnn
from vizcnn.deconv import Deconvnet, RectificationWarning
from vizcnn.train import render_batch


class RectifiedBackward(torch.autograd.Function):
    """The reference's rule, written independently of vizcnn: the activation's own forward,
    and a backward that passes relu(incoming signal)."""

    @staticmethod
    def forward(ctx, x, module):
        with torch.no_grad():
            return module(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_min(0.0), None


class Rectified(nn.Module):
    def __init__(self, activation: nn.Module):
        super().__init__()
        self.activation = activation

    def forward(self, x):
        return RectifiedBackward.apply(x, self.activation)


def mixed_net() -> nn.Sequential:
    """A small ZF-like chain for 64 x 64 inputs with PReLU, LeakyReLU and ELU, a ceil-mode pool
    and a fixed-size linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.PReLU(16),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(16, 32, 3, padding=1), nn.LeakyReLU(0.1),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ELU(inplace=True),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 8),
    )


@pytest.fixture(scope="module")
def trained_mixed() -> nn.Module:
    """``mixed_net`` trained briefly on the shapes data set (about 15 s on 2 cores; about 60 %
    held-out accuracy, chance is 12.5 %)."""
    torch.manual_seed(0)
    model = mixed_net()
    images, labels = render_batch(0, 0, 4096)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(6):
        for start in range(0, len(images), 64):
            loss = F.cross_entropy(model(images[start:start + 64]), labels[start:start + 64])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def reference_projection(model: nn.Module, x: torch.Tensor, layer: int, channel: int
                         ) -> torch.Tensor:
    """"max" mode by hand: a copy of the model with every activation's backward replaced by a
    ReLU of the signal, run up to ``layer``; the strongest unit's gradient times its value."""
    copy_ = copy.deepcopy(model)
    for index, module in enumerate(copy_):
        if isinstance(module, (nn.PReLU, nn.LeakyReLU, nn.ELU)):
            copy_[index] = Rectified(module)
    head = copy_[:layer + 1]
    x = x.clone().requires_grad_(True)
    maps = head(x)[:, channel]
    flat = maps.flatten(1)
    best = flat.argmax(1)
    unit = flat[torch.arange(len(x)), best]
    (grad,) = torch.autograd.grad(unit.sum(), x)
    return grad * unit.detach().view(-1, 1, 1, 1)


def assert_close(result: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().amax().item()
    assert scale > 0
    assert (result - expected).abs().amax().item() <= 1e-5 * scale


@pytest.mark.parametrize("layer", [1, 4, 7])
@pytest.mark.parametrize("route", ["explicit", "autograd"])
def test_every_activation_is_rectified_on_both_paths(trained_mixed, layer, route):
    x, _ = render_batch(1, 0, 4)
    name = str(layer)
    channel = 3
    with pytest.warns(RectificationWarning, match="rectified its signal at"):
        result = Deconvnet(trained_mixed).project(x, name, channel, route=route)
    assert_close(result, reference_projection(trained_mixed, x, layer, channel))


def test_rectify_matters_on_this_network(trained_mixed):
    """Not a vacuous comparison: with the gradient passed through PReLU / LeakyReLU / ELU the
    projection is another one."""
    x, _ = render_batch(1, 0, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RectificationWarning)
        paper = Deconvnet(trained_mixed).project(x, "7", 3)
        captum_rule = Deconvnet(trained_mixed).project(x, "7", 3, rectify="captum")
    assert (paper - captum_rule).abs().amax() > 0.05 * paper.abs().amax()


@pytest.mark.parametrize("layer", [4, 7])
def test_captum_choice_equals_captum(trained_mixed, layer):
    x, _ = render_batch(1, 0, 3)
    model = trained_mixed
    channel = 5
    with pytest.warns(RectificationWarning, match="ordinary gradient"):
        result = Deconvnet(model).project(x, str(layer), channel, rectify="captum")
    with torch.no_grad():
        maps = model[:layer + 1](x)[:, channel]
    expected = []
    for n in range(len(x)):
        flat = int(maps[n].flatten().argmax())
        y, x_ = divmod(flat, maps.shape[-1])
        attribution = NeuronDeconvolution(model, model[layer]).attribute(
            x[n:n + 1], neuron_selector=(channel, y, x_))
        expected.append(attribution * maps[n, y, x_])
    assert_close(result, torch.cat(expected))


class FunctionalResidual(nn.Module):
    """GELU as a function, SiLU as a module and a residual add: only the autograd path."""

    def __init__(self, gelu=F.gelu, silu: nn.Module | None = None):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.silu = silu or nn.SiLU()
        self.gelu = gelu
        self.out = nn.Conv2d(8, 6, 3, stride=2)

    def forward(self, x):
        x = self.gelu(self.stem(x))
        x = x + self.silu(self.body(x))
        return self.out(x)


def test_functional_and_module_activations_on_the_autograd_path():
    torch.manual_seed(1)
    model = FunctionalResidual().eval()
    reference = copy.deepcopy(model)
    reference.silu = Rectified(nn.SiLU())
    reference.gelu = lambda t: RectifiedBackward.apply(t, nn.GELU())
    x = torch.randn(2, 3, 21, 19)
    before = snapshot(model)
    with pytest.warns(RectificationWarning, match=r"F\.gelu x1, SiLU x1"):
        result = Deconvnet(model).project(x, "out", 4)
    assert_unchanged(model, before)
    x_ = x.clone().requires_grad_(True)
    maps = reference(x_)[:, 4].flatten(1)
    unit = maps.gather(1, maps.argmax(1, keepdim=True)).flatten()
    (grad,) = torch.autograd.grad(unit.sum(), x_)
    assert_close(result, grad * unit.detach().view(-1, 1, 1, 1))


def test_list_layers_names_each_kind(trained_mixed):
    assert vizcnn.list_layers(trained_mixed, "relu") == []  # a PReLU is not a ReLU
    assert vizcnn.list_layers(trained_mixed, "activation") == ["1", "4", "7"]
