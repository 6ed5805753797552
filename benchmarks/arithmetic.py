"""The arithmetic behind the refresh benchmark: how many floating-point
operations a network's inference pass costs, and how fast this machine can do
dense arithmetic at all. `benchmarks/performance.py` (part 3) reads them."""

import keras
import numpy as np
import tensorflow as tf

# Layers whose multiply-adds per image are (output positions) × (kernel size).
KERNEL_LAYERS = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv2D,
    keras.layers.Dense,
)


def forward_flops(model):
    """Floating-point operations of one image's inference pass through `model`:
    twice the multiply-adds of its convolutions and dense layers, nested models
    included. A convolution's (or dense layer's) multiply-adds are its output
    positions (every output axis but the batch and the channels) times its
    kernel's size. Normalisation, activations and pooling are left out: a few
    per cent of a CNN's operations.
    """
    return 2 * _multiply_adds(model)


def _multiply_adds(model):
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += _multiply_adds(layer)
        elif isinstance(layer, KERNEL_LAYERS):
            positions = int(np.prod(layer.output.shape[1:-1]))
            total += positions * int(np.prod(layer.kernel.shape))
    return total


def matmul_call(n):
    """One `n`×`n` float32 matrix product (2n³ operations) fetched to the host:
    the rate of the machine's best-tuned dense arithmetic, the ceiling a network
    pass can approach (a convolution may match it, not beat it by much)."""
    generator = tf.random.Generator.from_seed(0)
    a, b = generator.normal((n, n)), generator.normal((n, n))
    product = tf.function(tf.matmul)
    return lambda: product(a, b)[0, 0].numpy()


def refresh_arithmetic(flops_per_image, num_images, matmul_size, seconds):
    """What the refresh's arithmetic allows on this machine.

    A refresh per network is one inference pass over the N images (`flops_per_image`
    each); a CE epoch is about three (the backward pass computes the gradients of
    both the inputs and the weights of every layer). From the median `seconds` of
    `forward_twins` (two networks), `ce_epoch` and `matmul`, the rates each ran
    at, and the refresh per network over a CE epoch if the inference pass ran at
    the matrix product's rate: about the least a refresh can cost here.
    """
    forward = flops_per_image * num_images
    peak = 2 * matmul_size**3 / seconds["matmul"]
    return {
        "forward_mflop_per_image": flops_per_image / 1e6,
        "forward_gflops": 2 * forward / seconds["forward_twins"] / 1e9,
        "ce_epoch_gflops": 3 * forward / seconds["ce_epoch"] / 1e9,
        "matmul_gflops": peak / 1e9,
        "refresh_per_network_over_ce_epoch_at_peak": (
            forward / peak / seconds["ce_epoch"]
        ),
    }
