"""WiSE-FT: interpolation over ALL parameters and float buffers, exact endpoints."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainers.ensembles.wise_ft import interpolate_state_dicts, wise_ft


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    nn.init.uniform_(net[1].weight)       # BN affine starts at 1/0 in both nets otherwise
    nn.init.uniform_(net[1].bias)
    net.train()
    net(torch.randn(8, 3, 8, 8))          # moves BN running stats away from their init
    net[1].num_batches_tracked.fill_(7 + seed)
    return net.eval()


@pytest.fixture
def pair():
    return small_net(0), small_net(1)


def test_endpoints_are_exact(pair):
    zs, ft = pair
    x = torch.randn(4, 3, 8, 8)
    for alpha, ref in ((0.0, zs), (1.0, ft)):
        mixed = wise_ft(zs, ft, alpha)
        for key, value in mixed.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            assert torch.equal(value, ref.state_dict()[key]), (alpha, key)
        assert torch.equal(mixed(x), ref(x))


def test_midpoint_interpolates_every_float_tensor_including_head_and_bn_stats(pair):
    zs, ft = pair
    mixed = interpolate_state_dicts(zs.state_dict(), ft.state_dict(), 0.3)
    for key, value in mixed.items():
        a, b = zs.state_dict()[key], ft.state_dict()[key]
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, a)            # integer counter: taken from zero-shot
        else:
            assert not torch.equal(a, b), key       # the test is meaningful for this key
            assert torch.allclose(value, 0.7 * a + 0.3 * b, atol=1e-6), key
    assert {"3.weight", "3.bias", "1.running_mean", "1.running_var"} <= set(mixed)


def test_inputs_are_not_modified(pair):
    zs, ft = pair
    before = copy.deepcopy(zs.state_dict())
    wise_ft(zs, ft, 0.5)
    assert all(torch.equal(before[k], v) for k, v in zs.state_dict().items())


def test_mismatched_models_are_refused(pair):
    zs, _ = pair
    other = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="differ in keys"):
        interpolate_state_dicts(zs.state_dict(), other.state_dict(), 0.5)
