"""Images per second of the CDAS pipeline against a plain shuffled `tf.data` one,
and against what a GAL train step consumes.

Two settings, each timed side by side in one process, alternating over rounds:

- `memory`: CIFAR-shaped in-memory data (random uint8, 32×32×3, 10 classes, batch
  128) with crop+flip augmentation;
- `disk`: Clothing1M-shaped on-disk JPEGs (synthetic photos of varied size around
  300×300, 14 classes, batch 32) decoded and resized to 224×224 on demand
  (`galkeras.ImageFiles`), with random-resized-crop+flip augmentation.

The plain pipeline is `shuffle → (decode) → batch → augment`. CDAS yields two
batches per step (θA's and θB's), so its rate counts both. Then, for each
setting, the images per second a full GAL step (twins + θC, agreement phase)
consumes, 2 × batch / step time: a small CNN for `memory`, Keras' ResNet-50
(`weights=None`) for `disk`. The pipeline keeps up when its rate is above that.
Read the ratios: absolute numbers depend on the machine.

    python benchmarks/input_pipeline.py --out=benchmarks/results/input_pipeline.json
"""

import json
import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 50000, "In-memory training images (CIFAR: 50,000).")
flags.DEFINE_integer("num_jpegs", 3000, "Synthetic on-disk JPEGs.")
flags.DEFINE_integer("steps", 60, "Steps timed per round.")
flags.DEFINE_integer("rounds", 3, "Alternating timing rounds.")
flags.DEFINE_integer("train_steps", 6, "GAL train steps timed per setting.")
flags.DEFINE_string("jpeg_dir", "", "Where to write the JPEGs (default: a temp dir).")
flags.DEFINE_string("out", "", "Optional JSON output path.")


def _rate(dataset, steps, images_per_element):
    iterator = iter(dataset)
    for _ in range(5):  # warm-up: fill prefetch buffers, trace functions
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * images_per_element / (time.perf_counter() - start)


def _synthetic_jpegs(directory, count, rng):
    """Smooth random "photos" (low-frequency noise upsampled), 240–360 px a side,
    JPEG quality 90: closer to real photos' size and decode cost than white noise."""
    import tensorflow as tf

    paths = []
    for i in range(count):
        path = os.path.join(directory, f"{i:05d}.jpg")
        paths.append(path)
        if os.path.exists(path):
            continue
        height, width = (int(v) for v in rng.integers(240, 361, 2))
        coarse = rng.uniform(0, 255, (height // 16, width // 16, 3)).astype("float32")
        image = tf.image.resize(coarse, (height, width), method="bicubic")
        image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
        with open(path, "wb") as f:
            f.write(tf.io.encode_jpeg(image, quality=90).numpy())
    return paths


def _plain(images, labels, batch_size, aug, decode=None):
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    dataset = dataset.shuffle(len(labels))
    if decode is not None:
        dataset = dataset.map(
            lambda path, y: (decode(path), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    dataset = dataset.batch(batch_size, drop_remainder=True).enumerate()
    dataset = dataset.map(
        lambda step, xy: (aug(tf.cast(xy[0], tf.float32), tf.stack([0, step])), xy[1]),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def _train_rate(make_net, images, labels, num_classes, batch_size, aug, steps):
    """Images/s a full GAL agreement step (twins + θC) consumes: 2·bs / step time."""
    import keras

    from galkeras.model import GAL
    from galkeras.training_set import TrainingSet

    gal = GAL(make_net(), make_net(), make_net(), warmup_epochs=0)
    gal.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    training_set = TrainingSet(
        images,
        labels,
        batch_size=batch_size,
        augment=aug,
        num_classes=num_classes,
    )
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    gal.fit(training_set, epochs=1, verbose=0, callbacks=[Timer()])
    times = sorted(times[2:])  # the first steps trace and compile
    return 2 * batch_size / times[len(times) // 2]


def _side_by_side(pipelines, rounds, steps):
    import numpy as np

    rates = {name: [] for name in pipelines}
    for _ in range(rounds):
        for name, (dataset, per_element) in pipelines.items():
            rates[name].append(_rate(dataset, steps, per_element))
    return {
        "images_per_second": {k: float(np.median(v)) for k, v in rates.items()},
        "rounds": rates,
    }


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from galkeras import augment, backbones, sampling
    from galkeras.image_files import ImageFiles

    rng = np.random.default_rng(0)
    result = {"cpu_count": os.cpu_count()}

    # In memory, CIFAR-shaped.
    n, bs = FLAGS.num_images, 128
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    aug = augment.make_augment("crop_flip", (32, 32, 3))
    sampler = sampling.CDASSampler(labels, bs, num_classes=10, warmup_steps=0)
    memory = _side_by_side(
        {
            "plain": (_plain(images, labels, bs, aug), bs),
            "cdas": (
                sampling.paired_dataset(
                    sampler, images, labels, start_step=0, augment=aug
                ),
                2 * bs,
            ),
        },
        FLAGS.rounds,
        FLAGS.steps,
    )
    memory["train_step_consumes"] = _train_rate(
        lambda: backbones.small_cnn((32, 32, 3), 10, (127.5,) * 3, (64.0,) * 3),
        images[: bs * (FLAGS.train_steps + 2)],
        labels[: bs * (FLAGS.train_steps + 2)],
        10,
        bs,
        aug,
        FLAGS.train_steps,
    )
    memory.update(num_images=n, batch_size=bs, train_model="small_cnn")
    result["memory"] = memory

    # On disk, Clothing1M-shaped.
    bs = 32
    directory = FLAGS.jpeg_dir or tempfile.mkdtemp(prefix="galkeras_jpegs_")
    os.makedirs(directory, exist_ok=True)
    paths = _synthetic_jpegs(directory, FLAGS.num_jpegs, rng)
    labels = rng.integers(0, 14, len(paths))
    files = ImageFiles(paths, (224, 224))
    aug = augment.make_augment("resized_crop_flip", (224, 224, 3))
    sampler = sampling.CDASSampler(labels, bs, num_classes=14, warmup_steps=0)
    disk = _side_by_side(
        {
            "plain": (_plain(paths, labels, bs, aug, decode=files.decode), bs),
            "cdas": (
                sampling.paired_dataset(
                    sampler, files, labels, start_step=0, augment=aug
                ),
                2 * bs,
            ),
        },
        FLAGS.rounds,
        FLAGS.steps,
    )

    def resnet50():
        return keras.applications.ResNet50(
            weights=None,
            input_shape=(224, 224, 3),
            classes=14,
            classifier_activation=None,
        )

    count = bs * (FLAGS.train_steps + 2)
    disk["train_step_consumes"] = _train_rate(
        resnet50,
        files.subset(np.arange(count)),
        labels[:count],
        14,
        bs,
        aug,
        FLAGS.train_steps,
    )
    disk.update(
        num_images=len(paths),
        batch_size=bs,
        image_size=[224, 224],
        mean_jpeg_bytes=float(np.mean([os.path.getsize(p) for p in paths])),
        train_model="keras.applications.ResNet50(weights=None)",
    )
    result["disk"] = disk

    print(
        f"{'setting':<8}{'plain img/s':>14}{'CDAS img/s':>14}{'CDAS/plain':>12}"
        f"{'GAL step img/s':>16}"
    )
    for name in ("memory", "disk"):
        r = result[name]
        rates = r["images_per_second"]
        r["cdas_over_plain"] = rates["cdas"] / rates["plain"]
        r["cdas_over_train_step"] = rates["cdas"] / r["train_step_consumes"]
        print(
            f"{name:<8}{rates['plain']:>14.0f}{rates['cdas']:>14.0f}"
            f"{r['cdas_over_plain']:>12.2f}{r['train_step_consumes']:>16.0f}"
        )
    print("Targets: CDAS/plain >= 0.75; CDAS img/s above what the GAL step consumes.")
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
