"""What a GPU user asks first, measured in one go: one JSON, in at most about
8 minutes on one GPU.

1. `steps`: the train step of CE (θA alone), GAL's warm-up (θA + θC), the twins
   (θA + θB with agreement, no θC) and full GAL on PreAct ResNet-18 at batch 128
   (32×32×3), with XLA (`jit_compile=True`: the whole step, as `--strategy=auto`
   on one GPU gets it), in float32 and in bfloat16 (`mixed_bfloat16`). Medians
   of interleaved rounds on a fixed in-memory batch stream, each contender's
   first call (trace and XLA compile) timed apart, and ratios to CE beside the
   paper's 2.43 (Table 6, whole runs on a V100).
2. `memory`: each contender's peak GPU memory above what was in use before its
   first step (`tf.config.experimental.get_memory_info`; `null` on a CPU).
3. `run`: a 3-epoch `galkeras.train.run` (W = 1) on synthetic CIFAR-shaped data
   with `--jit_compile=auto`, its wall time, its `fit` seconds, and its floor:
   each epoch's steps at the step times of part 1 (a warm-up epoch at GAL's
   warm-up step, later epochs at the full step).
4. `environment`: TensorFlow, Keras, Python, the device's name, the commit.

    bash benchmarks/gpu_check.sh gpu_check            # on a GPU machine
    python benchmarks/gpu_check.py --tiny --out=/tmp/gpu_check   # CPU smoke test

`--tiny` (what the test suite runs on a CPU) uses a width-8 small CNN on 16×16
images at batch 16 and a few steps: it checks that the script works, and its
figures mean nothing.
"""

import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import performance as perf  # noqa: E402  (defines --tiny and --out)
import tensorflow as tf  # noqa: E402
from absl import app, logging  # noqa: E402

from galkeras import train  # noqa: E402

FLAGS = perf.FLAGS
# The step contenders, each the performance benchmark's `<name>_xla`.
CONTENDERS = ("ce", "gal_warmup", "twins", "gal")
DTYPES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def settings():
    if FLAGS.tiny:
        return dict(
            backbone=perf.Backbone("small_cnn", (16, 16, 3), width=8),
            batch_size=16,
            images=64,
            steps=2,
            rounds=1,
            run_images=64,
            # The smoke test's time: the two ends of the step's cost only, and
            # bfloat16 for CE alone.
            contenders=("ce", "gal"),
            bfloat16_contenders=("ce",),
        )
    return dict(
        backbone=perf.Backbone("preact_resnet18", (32, 32, 3)),
        batch_size=128,
        images=1024,
        steps=20,
        rounds=3,
        run_images=5000,
        contenders=CONTENDERS,
        bfloat16_contenders=CONTENDERS,
    )


def gpu():
    """The first GPU's logical name, or None."""
    devices = tf.config.list_logical_devices("GPU")
    return devices[0].name if devices else None


def memory_in_use():
    device = gpu()
    return None if device is None else tf.config.experimental.get_memory_info(device)


def step_times(s, dtype):
    """Part 1 and 2 for one dtype."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(DTYPES[dtype])
    try:
        bench = perf.Bench(s["backbone"], s["batch_size"], s["images"])
        contenders, memory = {}, {}
        names = s["bfloat16_contenders" if dtype == "bfloat16" else "contenders"]
        for name in names:
            before = memory_in_use()
            if before is not None:
                tf.config.experimental.reset_memory_stats(gpu())
            # Builds the model and runs its first step (trace, XLA compile).
            contenders[name] = (bench.stepper(f"{name}_xla"), s["steps"])
            after = memory_in_use()
            memory[name] = (
                None if after is None else int(after["peak"] - before["current"])
            )
        first_call = {name: bench.trace_seconds[f"{name}_xla"] for name in names}
        times = perf.side_by_side(contenders, s["rounds"], warmup=1)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    seconds = {name: perf.median(t) for name, t in times.items()}
    return {
        "seconds": seconds,
        "first_call_seconds": first_call,
        "over_ce": {name: seconds[name] / seconds["ce"] for name in seconds},
        "peak_memory_bytes": memory,
    }


def whole_run(s, step):
    """Part 3: a 3-epoch run through `galkeras.train.run`."""
    directory = tempfile.mkdtemp(prefix="galkeras-gpu-check-")
    images, _, labels = perf.synthetic_data(s["run_images"], (32, 32, 3), seed=0)
    test, _, test_labels = perf.synthetic_data(s["run_images"] // 5, (32, 32, 3), 1)
    path = os.path.join(directory, "data.npz")
    np.savez(path, x_train=images, y_train=labels, x_test=test, y_test=test_labels)
    config = train.TrainConfig(
        dataset=f"npz:{path}",
        noise_type="sym",
        noise_rate=0.5,
        backbone=s["backbone"].kind,
        backbone_width=s["backbone"].width or 0,
        batch_size=s["batch_size"],
        epochs=3,
        warmup_epochs=1,
        lr_decay_epochs=(),
        verbose=0,
        model_dir=os.path.join(directory, "run"),
        export_dir=os.path.join(directory, "export"),
    )
    keras.backend.clear_session()
    start = time.perf_counter()
    try:
        summary = train.run(config)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    steps = s["run_images"] // s["batch_size"]
    floor = steps * (step.get("gal_warmup", step["gal"]) + 2 * step["gal"])
    return {
        "images": s["run_images"],
        "image_shape": [32, 32, 3],
        "epochs": 3,
        "warmup_epochs": 1,
        "jit_compile": config.jit_compile,
        "wall_seconds": wall,
        "fit_seconds": summary["seconds_per_epoch"] * 3,
        "floor_seconds": floor,
        "wall_over_floor": wall / floor,
        "last_test_accuracy": summary["student"]["last"],
    }


def main(argv):
    del argv
    perf.smoke_test_mode()
    logging.set_verbosity(logging.WARNING)
    if not FLAGS.out:
        raise app.UsageError("--out=DIRECTORY is required.")
    os.makedirs(FLAGS.out, exist_ok=True)
    s = settings()
    device = gpu()
    details = (
        tf.config.experimental.get_device_details(
            tf.config.list_physical_devices("GPU")[0]
        )
        if device
        else {}
    )
    result = {
        "settings": {
            "backbone": s["backbone"].kind,
            "image_shape": list(s["backbone"].image_shape),
            "batch_size": s["batch_size"],
            "steps_per_round": s["steps"],
            "rounds": s["rounds"],
            "jit_compile": True,
            "tiny": FLAGS.tiny,
        },
        "environment": {
            **perf.environment(),
            "python": platform.python_version(),
            "device": details.get("device_name") or device or "CPU",
        },
        "paper_gal_over_ce": perf.PAPER_GAL_OVER_CE,
    }
    started = time.perf_counter()
    result["steps"] = {dtype: step_times(s, dtype) for dtype in DTYPES}
    result["run"] = whole_run(s, result["steps"]["float32"]["seconds"])
    result["seconds"] = time.perf_counter() - started
    path = os.path.join(FLAGS.out, "gpu_check.json")
    perf.write_json(path, result)
    for dtype, part in result["steps"].items():
        shown = ", ".join(
            f"{n} {1000 * t:.1f} ms ({part['over_ce'][n]:.2f}× CE)"
            for n, t in part["seconds"].items()
        )
        print(f"{dtype}: {shown}")
    run = result["run"]
    print(
        f"3-epoch run: {run['wall_seconds']:.1f} s, floor {run['floor_seconds']:.1f} s"
        f" ({run['wall_over_floor']:.2f}×); written to {path}"
    )


if __name__ == "__main__":
    app.run(main)
