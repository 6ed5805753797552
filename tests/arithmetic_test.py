"""The refresh benchmark's arithmetic, against operation counts worked by hand."""

import os
import sys

import keras
import pytest

from galkeras import backbones

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import arithmetic  # noqa: E402


def test_small_cnn_flops_are_its_convolutions_and_head_by_hand():
    net = backbones.small_cnn((32, 32, 3), 10, [0.0] * 3, [1.0] * 3, width=32)
    # 3x3 convolutions at 32x32 (3->32, 32->32), max-pool, at 16x16 (32->64,
    # 64->64), max-pool, global pooling, then the 64->10 head.
    macs = (
        32 * 32 * 9 * 3 * 32
        + 32 * 32 * 9 * 32 * 32
        + 16 * 16 * 9 * 32 * 64
        + 16 * 16 * 9 * 64 * 64
        + 64 * 10
    )
    assert arithmetic.forward_flops(net) == 2 * macs == 48_956_672


def test_nested_models_strides_groups_and_dense_positions_count():
    inner_in = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", groups=2)(inner_in)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="valid")(x)
    inner = keras.Model(inner_in, x)  # [4, 4, 6] then [2, 2, 12]
    outer_in = keras.Input((8, 8, 4))
    y = inner(outer_in)
    y = keras.layers.Dense(5)(y)  # applied at each of the 2x2 positions
    y = keras.layers.Flatten()(y)
    y = keras.layers.Dense(3)(y)
    model = keras.Model(outer_in, y)
    macs = 4 * 4 * 9 * 2 * 6 + 2 * 2 * 9 * 6 * 2 + 2 * 2 * 12 * 5 + 20 * 3
    assert arithmetic.forward_flops(model) == 2 * macs


def test_refresh_arithmetic_rates_and_the_lowest_reachable_ratio():
    figures = arithmetic.refresh_arithmetic(
        flops_per_image=1e6,
        num_images=1000,
        matmul_size=1000,
        seconds={"forward_twins": 0.01, "ce_epoch": 0.05, "matmul": 0.01},
    )
    assert figures["forward_mflop_per_image"] == pytest.approx(1.0)
    assert figures["forward_gflops"] == pytest.approx(200.0)  # 2 x 1e9 in 10 ms
    assert figures["ce_epoch_gflops"] == pytest.approx(60.0)  # 3e9 in 50 ms
    assert figures["matmul_gflops"] == pytest.approx(200.0)  # 2e9 in 10 ms
    # 1e9 at 200 GFLOP/s is 5 ms, a tenth of the 50 ms epoch.
    assert figures["refresh_per_network_over_ce_epoch_at_peak"] == pytest.approx(0.1)
