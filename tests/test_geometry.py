"""Layer geometry and the forward trace (vizcnn.geometry), checked against brute force and
against the paths that do not use it: padding="same" with an even kernel (asymmetric in
PyTorch) and ceil-mode average pools."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vizcnn import Deconvnet, occlusion
from vizcnn.geometry import geometry_of


@settings(max_examples=60, deadline=None)
@given(kernel=st.integers(1, 7), stride=st.integers(1, 4), padding=st.integers(0, 3),
       dilation=st.integers(1, 3), size=st.integers(8, 30), first=st.integers(0, 29),
       extent=st.integers(1, 6))
def test_outputs_touched_and_crop_arithmetic_match_brute_force(kernel, stride, padding,
                                                               dilation, size, first, extent):
    reach = dilation * (kernel - 1)
    if padding > kernel // 2 or size + 2 * padding < reach + 1:
        return  # PyTorch refuses such a layer
    first = min(first, size - 1)
    last = min(first + extent - 1, size - 1)
    conv = nn.Conv2d(1, 1, kernel, stride, padding, dilation)
    geometry = geometry_of(conv)
    out = (size + 2 * padding - reach - 1) // stride + 1
    # by brute force: output o's window spans inputs [o S - P, o S - P + D (K - 1)]
    touched = [o for o in range(out)
               if o * stride - padding <= last and o * stride - padding + reach >= first]
    low, high = geometry.outputs_touched(torch.tensor([[first, first]]),
                                         torch.tensor([[last, last]]))
    assert touched == [o for o in range(out) if int(low[0, 0]) <= o <= int(high[0, 0])]
    # n outputs from (n - 1) S + D (K - 1) + 1 inputs starting at start S - P
    n = max(1, len(touched))
    assert geometry.input_length((n, n))[0] == (n - 1) * stride + reach + 1
    assert int(geometry.input_start(torch.tensor([[3, 3]]))[0, 0]) == 3 * stride - padding


class SamePadding(nn.Module):
    """An even-kernel "same" conv (one more pixel of padding after the map than before), a
    ceil-mode average pool and a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 4, padding="same")
        self.act1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, (2, 3), padding="same", dilation=(1, 2))
        self.act2 = nn.ReLU()
        self.avg = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 5 * 5, 4))

    def forward(self, x):
        x = self.act2(self.conv2(self.pool(self.act1(self.conv1(x)))))
        return self.head(self.avg(x))


def _same_padding_net() -> nn.Module:
    torch.manual_seed(11)
    return SamePadding().eval()


def test_explicit_deconvnet_takes_same_padding_and_equals_autograd():
    model = _same_padding_net()
    x = torch.randn(2, 3, 19, 17)
    net = Deconvnet(model)
    for mode in ("max", "map"):
        for channel in (0, 5):
            explicit = net.project(x, "act2", channel, mode=mode, route="explicit")
            autograd = net.project(x, "act2", channel, mode=mode, route="autograd")
            torch.testing.assert_close(explicit, autograd, rtol=1e-5, atol=1e-6)


def test_incremental_occlusion_equals_naive_on_same_padding_and_ceil_mode_average():
    model = _same_padding_net()
    x = torch.randn(2, 3, 18, 18)
    kwargs = dict(window=5, stride=3, fill=0.0, layer="act2", progress=False)
    incremental = occlusion(model, x, engine="incremental", **kwargs)
    naive = occlusion(model, x, engine="naive", **kwargs)
    torch.testing.assert_close(incremental.prob, naive.prob, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(incremental.activation, naive.activation, rtol=1e-6, atol=1e-6)
    assert torch.equal(incremental.label, naive.label)
