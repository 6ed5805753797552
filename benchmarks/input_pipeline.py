"""Images per second of the CDAS pipeline against a plain shuffled `tf.data` one.

Both run side by side in one process, on the same CIFAR-shaped in-memory data
(random uint8, 32×32×3, 10 classes) with the same crop+flip augmentation, and
are timed alternately over several rounds. CDAS yields two batches per step (θA's
and θB's), so its rate counts both. The ratio is what to read: absolute numbers
depend on the machine.

    python benchmarks/input_pipeline.py --out=benchmarks/results/input_pipeline.json

(Issue #3 item 8, in-memory half. The on-disk JPEG half waits for the on-disk
image source that Clothing1M needs.)
"""

import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 50000, "Training images (CIFAR: 50,000).")
flags.DEFINE_integer("batch_size", 128, "Batch size per twin.")
flags.DEFINE_integer("steps", 150, "Batches timed per round.")
flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")
flags.DEFINE_string("out", "", "Optional JSON output path.")


def _rate(dataset, steps, images_per_element):
    iterator = iter(dataset)
    for _ in range(10):  # warm-up: fill prefetch buffers, trace functions
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * images_per_element / (time.perf_counter() - start)


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    from galkeras import augment, sampling

    rng = np.random.default_rng(0)
    n, bs = FLAGS.num_images, FLAGS.batch_size
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    aug = augment.make_augment("crop_flip", (32, 32, 3), seed=0)

    plain = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .repeat()
        .shuffle(n)
        .batch(bs, drop_remainder=True)
        .map(
            lambda x, y: (aug(tf.cast(x, tf.float32)), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE)
    )
    sampler = sampling.CDASSampler(
        labels, bs, num_classes=10, mode="cdas", warmup_steps=0
    )
    cdas = sampling.paired_dataset(sampler, images, labels, start_step=0, augment=aug)

    rates = {"plain": [], "cdas": []}
    for _ in range(FLAGS.rounds):
        rates["plain"].append(_rate(plain, FLAGS.steps, bs))
        rates["cdas"].append(_rate(cdas, FLAGS.steps, 2 * bs))
    result = {
        "images_per_second": {k: float(np.median(v)) for k, v in rates.items()},
        "rounds": rates,
        "num_images": n,
        "batch_size": bs,
        "cpu_count": os.cpu_count(),
    }
    result["cdas_over_plain"] = (
        result["images_per_second"]["cdas"] / result["images_per_second"]["plain"]
    )
    print(f"{'pipeline':<10}{'images/s (median)':>20}")
    for k, v in result["images_per_second"].items():
        print(f"{k:<10}{v:>20.0f}")
    print(f"CDAS / plain: {result['cdas_over_plain']:.2f} (target: >= 0.75)")
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
