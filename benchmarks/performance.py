"""Speed and memory of GAL against cross entropy (CE), on whatever machine runs it.

Six parts. Each prints a Markdown table and, with `--out=DIR`, writes a JSON file
to DIR (all the tables also go to `DIR/tables.md`, the targets to
`DIR/summary.json`). Within a part every contender is timed side by side in this
one process: the contenders take turns over rounds, in reversed order every other
round, each round starts with untimed warm-up calls, and a figure is the median
over every timed call of all rounds. Ratios are ratios of those medians; the JSON
also keeps each round's own ratio. Read the ratios: absolute times depend on the
machine and on whatever else runs on it.

1. `step` (step_time.json): one train step at batch 128 on 32×32×3 images, 10
   classes, for `small_cnn` and `preact_resnet18`. Steps are driven by calling the
   compiled `train_function` (what `fit` calls once per step) on an iterator over
   8 CDAS batches held in memory, so input-pipeline cost is excluded. Contenders:
   - `ce_keras`: the backbone alone as a plain `keras.Model` (compiled CE loss,
     the same SGD), for reference;
   - `ce`: `GAL` in phase "warmup" with `train_student=False` (θA's CE step, the
     `_warmup_step` path: how galkeras trains its CE baseline);
   - `gal_warmup`: GAL's own warm-up step, phase "warmup" with θC (θA's CE step
     plus θC's step: galkeras trains θC from the first epoch, docs/methods.md);
   - `twins`: phase "agreement", `train_student=False` (both twins, Eq. 4-5
     cosine, gates, `skip` update);
   - `twins_all`: the same with `update_rule="all"` (the cosine and its logging
     are still computed; the update is not gated);
   - `twins_zero_grad`: the same with `masked_update="zero_grad"`;
   - `gal`: the full GAL step (twins + θC on Eq. 9-11);
   - `agreement`: a `tf.function` running only `gradient_agreement` +
     `agreement_gates` on random gradient tensors of the backbone's shapes;
   - `apply`, `apply_skip_closed`, `apply_skip_open`: θB's optimizer applying
     zero gradients to θB's variables directly, and through `GatedUpdate.apply`
     in the `skip` mode with every gate closed (every variable and optimizer slot
     put back: the most the skip mode can add) and with every gate open.
   Agreement and gating = `agreement` + (`apply_skip_closed` − `apply`): an upper
   bound, as in training some gates are open. The same share is measured at
   each `agreement_granularity` (`agreement_channel`, `agreement_element`,
   `apply_skip_closed_channel`, `apply_skip_closed_element`: the coefficients
   and the closed gates at that granularity), as
   `agreement_gating_by_granularity`. The round-paired differences
   `twins` − `twins_all` (the skip restore at the real gates) and
   `twins_zero_grad` − `twins_all` are reported as a cross-check.
2. `scaling` (agreement_scaling.json): `agreement` and the skip-restore overhead
   (`apply_skip_closed` − `apply`) for small CNN, PreAct ResNet-18, ResNet-34 and
   ResNet-50 (`weights=None`). Both depend only on the variables' shapes, so the
   ResNet-34/50 are built for 64×64 inputs. A least-squares slope of log time
   against log parameters ≤ 1 means the cost grows no faster than linearly.
3. `refresh` (refresh.json): one `refresh_pseudo_labels` pass over the N training
   images (its own batch size, `teacher.refresh_batch_size`) against one CE epoch
   over the same N (⌈N/128⌉ `ce` steps on the in-memory stream), before the
   warm-up switch (θA only) and after it (θA and θB); its floor, θA's and θB's
   plain inference calls on the N images already in memory (`forward_twins`);
   and one evaluation pass (`evaluate`) of the validation set in either phase,
   which part 4's floor needs. Beside them, the arithmetic: the inference pass's
   operations per image (`forward_flops`), the rates the forward pass and the CE
   epoch ran at, a 4096×4096 float32 matrix product's rate (`matmul`, the
   ceiling of this machine's dense arithmetic), and the refresh per network over
   a CE epoch if the inference pass ran at that rate: about the least a refresh
   can cost here.
4. `run` (whole_run.json): whole `fit` runs on the same N images (`small_cnn`,
   crop+flip augmentation, per-epoch validation, E = 10, W = 4): GAL, CE as
   galkeras runs it (`GAL`, W = E, `train_student=False`) and CE in plain Keras.
   The floor is the sum of the measured parts for that schedule:
   W·(epoch_warm + refresh_θA + eval_warmup) + (E−W)·(epoch_GAL + refresh_θAθB +
   eval_split), the epochs from part 1's medians (⌈N/128⌉ steps each), the
   refreshes and evaluations from part 3. A warm-up epoch of GAL trains θA and
   θC (`gal_warmup` steps); the floor with CE warm-up epochs (`ce` steps) is
   kept beside it as `gal_ce_warmup`. The floor is also measured again in every
   round, right after that round's runs (`floor_same_round`). Callback
   timestamps split each run's wall time into its parts (`profiles`).
5. `memory` (memory.json): peak memory of one contender per fresh subprocess
   (`ce_keras`, `ce`, `twins`, `gal`): TensorFlow's CPU allocator
   (`tf.config.experimental.get_memory_info("CPU:0")`, peak over a few steps
   after the first, minus what was in use before the models were built), and the
   process's peak RSS (VmHWM, building and tracing included) minus its RSS at
   that same point.
6. `table6` (training_time.json): the paper's Table 6, every method's whole run
   (`galkeras.train.run`, all that `python -m galkeras.train` does: data, noise,
   networks, `fit` with per-epoch evaluation and checkpoints, export) on the same
   small run: N synthetic 32×32×3 images, 10 classes, 50% symmetric noise added
   by the harness (the paper's CIFAR-10 sym 50%), `small_cnn`, crop+flip, batch
   128, E = 5 epochs, no learning-rate decay. Each method keeps its defaults,
   except where the short run would hide a phase: GAL's warm-up is W = 2 < E
   (80 of the paper's 200 epochs) and Co-teaching+ disagrees from epoch 1 (its
   `init_epoch`, 20 of 200 in its paper). Every method first runs once untimed
   (a dry run); then the methods take turns over `--table6_rounds` rounds, the
   order rotated by one method each round, each run after `clear_session`.
   Figures are medians over rounds: the whole run's wall time and its ratio to
   CE (the JSON also keeps each round's own ratio), and the seconds per epoch of
   `fit` alone (`seconds_per_epoch` of the run's summary: tracing included, the
   set-up and the export not), beside the paper's hours and ratios on a V100.

    python benchmarks/performance.py --out=benchmarks/results/performance
    python benchmarks/performance.py --tiny --out=/tmp/performance  # < 2 minutes
    python benchmarks/performance.py --parts=table6 \
        --out=benchmarks/results/performance_table6  # ~7 minutes on 2 cores

`--parts=step,refresh` runs some parts only.
"""

import concurrent.futures
import dataclasses
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import arithmetic  # noqa: E402  (benchmarks/, the script's own directory)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from galkeras import (  # noqa: E402
    agreement,
    augment,
    backbones,
    optimizers,
    sampling,
    teacher,
    train,
)
from galkeras.gated_update import GatedUpdate  # noqa: E402
from galkeras.model import GAL  # noqa: E402
from galkeras.training_set import TrainingSet  # noqa: E402

PARTS = ("step", "scaling", "refresh", "run", "memory", "table6")

FLAGS = flags.FLAGS
flags.DEFINE_bool(
    "tiny",
    False,
    "Small batch, inputs, nets and counts, and no Grappler graph rewrites (they "
    "double the first call of each of its many tiny functions): a smoke test "
    "whose figures mean nothing.",
)
flags.DEFINE_string("out", "", "Directory for the JSON files and tables.md.")
flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {PARTS}.")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds (parts 1-3).")
flags.DEFINE_integer("steps", 30, "Timed small-CNN steps per contender per round.")
flags.DEFINE_integer("resnet_steps", 8, "Timed ResNet steps per contender per round.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed calls per contender per round.")
flags.DEFINE_integer("run_rounds", 2, "Interleaved rounds of whole runs (part 4).")
flags.DEFINE_integer(
    "table6_rounds", 3, "Rotated rounds of every method's whole run (part 6)."
)
flags.DEFINE_string("memory_probe", "", "Internal: one part-5 measurement (JSON).")
flags.register_validator(
    "parts", lambda parts: set(parts) <= set(PARTS), f"--parts must be in {PARTS}."
)

NUM_CLASSES = 10
MEAN, STD = (127.5,) * 3, (64.0,) * 3
TAU = 0.4
NOISE_RATE = 0.4
STEP_CONTENDERS = (
    "ce_keras",
    "ce",
    "gal_warmup",
    "twins",
    "twins_all",
    "twins_zero_grad",
    "gal",
    "gal_xla_passes",
    "gal_xla",
)
# GAL options of each GAL contender (`ce_keras` is a plain keras.Model).
GAL_OPTIONS = {
    "ce": dict(warmup_epochs=1, train_student=False),
    "gal_warmup": dict(warmup_epochs=1, train_student=True),
    "twins": dict(warmup_epochs=0, train_student=False),
    "twins_all": dict(warmup_epochs=0, train_student=False, update_rule="all"),
    "twins_zero_grad": dict(
        warmup_epochs=0, train_student=False, masked_update="zero_grad"
    ),
    "gal": dict(warmup_epochs=0, train_student=True),
    # XLA: each network's pass compiled (what every strategy gets), and the
    # whole step too (what Keras adds without a strategy).
    "gal_xla_passes": dict(
        warmup_epochs=0, train_student=True, jit_compile=True, whole_step=False
    ),
    "gal_xla": dict(warmup_epochs=0, train_student=True, jit_compile=True),
}
# The rest of the step contenders with XLA (the whole step and each pass), for
# benchmarks/gpu_check.py.
GAL_OPTIONS.update(
    {
        f"{name}_xla": {**GAL_OPTIONS[name], "jit_compile": True}
        for name in ("ce", "gal_warmup", "twins")
    }
)
MEMORY_CONTENDERS = ("ce_keras", "ce", "twins", "gal")
TARGETS = {
    "twins_over_ce": 2.05,
    "gal_over_ce": 3.1,
    "agreement_gating_over_twins": 0.03,
    "refresh_per_network_over_ce_epoch": 0.15,
    "wall_over_floor": 1.10,
    "agreement_scaling_slope": 1.0,
}
PAPER_GAL_OVER_CE = 2.43  # Table 6: GAL 5.1 h / CE 2.1 h, CIFAR-10 sym50, one V100
# Table 6: total training time in hours, CIFAR-10 with 50% symmetric noise, one
# V100. galkeras has no Co-learning: its row is the paper's alone.
PAPER_TABLE6_HOURS = {
    "ce": 2.1,
    "coteaching": 4.3,
    "coteaching_plus": 4.3,
    "jocor": 4.4,
    "colearning": 5.2,
    "gal": 5.1,
}
TABLE6_METHODS = ("ce", "coteaching", "coteaching_plus", "jocor", "gal", "gal_split")
METHOD_LABELS = {
    "ce": "Cross entropy",
    "coteaching": "Co-teaching",
    "coteaching_plus": "Co-teaching+",
    "jocor": "JoCoR",
    "colearning": "Co-learning",
    "gal": "GAL",
    "gal_split": "GAL, θC from the split",
}


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A backbone as the benchmark builds it."""

    kind: str
    image_shape: tuple
    width: int = None

    @property
    def label(self):
        return self.kind if self.width is None else f"{self.kind} (width {self.width})"

    def build(self, name):
        return backbones.build_backbone(
            self.kind,
            self.image_shape,
            NUM_CLASSES,
            MEAN,
            STD,
            width=self.width,
            name=name,
        )


@dataclasses.dataclass
class Settings:
    batch_size: int
    step_backbones: tuple
    scaling_backbones: tuple
    steps: dict  # kind -> timed steps per contender per round
    images: dict  # kind -> N of parts 1, 3 (and 4 for small_cnn)
    rounds: int
    warmup_steps: int
    matmul_size: int  # part 3's peak: one n×n float32 product
    scaling_calls: int
    run_epochs: int
    run_warmup_epochs: int
    run_rounds: int
    memory_backbones: tuple
    memory_contenders: tuple
    memory_steps: int
    table6_images: int  # training images; the test split has a quarter as many
    table6_image_shape: tuple
    table6_width: int  # small_cnn's width; 0: its own
    table6_batch_size: int
    table6_epochs: int
    table6_warmup_epochs: int  # GAL's W
    table6_init_epoch: int  # Co-teaching+'s first epoch of disagreement
    table6_rounds: int
    table6_dry_runs: bool  # an untimed dry run of every method first


def settings_from_flags():
    if FLAGS.tiny:
        cnn = Backbone("small_cnn", (16, 16, 3), width=8)
        return Settings(
            batch_size=16,
            step_backbones=(cnn,),
            scaling_backbones=(cnn, Backbone("small_cnn", (16, 16, 3), width=32)),
            steps={"small_cnn": 3},
            images={"small_cnn": 256},
            rounds=1,
            warmup_steps=1,
            matmul_size=128,
            scaling_calls=3,
            run_epochs=2,
            run_warmup_epochs=1,
            run_rounds=1,
            memory_backbones=(cnn,),
            memory_contenders=("ce_keras", "gal"),
            memory_steps=2,
            table6_images=64,
            table6_image_shape=(8, 8, 3),
            table6_width=8,
            table6_batch_size=16,
            table6_epochs=2,
            table6_warmup_epochs=1,
            table6_init_epoch=1,
            table6_rounds=1,
            table6_dry_runs=False,
        )
    cifar = (32, 32, 3)
    return Settings(
        batch_size=128,
        step_backbones=(
            Backbone("small_cnn", cifar),
            Backbone("preact_resnet18", cifar),
        ),
        scaling_backbones=(
            Backbone("small_cnn", cifar),
            Backbone("preact_resnet18", cifar),
            Backbone("resnet34", (64, 64, 3)),
            Backbone("resnet50", (64, 64, 3)),
        ),
        steps={"small_cnn": FLAGS.steps, "preact_resnet18": FLAGS.resnet_steps},
        images={"small_cnn": 4096, "preact_resnet18": 1024},
        rounds=FLAGS.rounds,
        warmup_steps=FLAGS.warmup_steps,
        matmul_size=4096,
        scaling_calls=10,
        run_epochs=10,
        run_warmup_epochs=4,
        run_rounds=FLAGS.run_rounds,
        memory_backbones=(
            Backbone("small_cnn", cifar),
            Backbone("preact_resnet18", cifar),
        ),
        memory_contenders=MEMORY_CONTENDERS,
        memory_steps=3,
        table6_images=2048,
        table6_image_shape=cifar,
        table6_width=0,
        table6_batch_size=128,
        table6_epochs=5,
        table6_warmup_epochs=2,
        table6_init_epoch=1,
        table6_rounds=FLAGS.table6_rounds,
        table6_dry_runs=True,
    )


# ------------------------------------------------------------------ timing
def side_by_side(contenders, rounds, warmup):
    """Times `{name: (fn, calls)}` interleaved over rounds.

    Returns `{name: [[seconds of each timed call] for each round]}`.
    """
    times = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, calls = contenders[name]
            for _ in range(warmup):
                fn()
            round_times = []
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                round_times.append(time.perf_counter() - start)
            times[name].append(round_times)
    return times


def median(times):
    return float(np.median([t for round_times in times for t in round_times]))


def round_medians(times):
    return [float(np.median(round_times)) for round_times in times]


def ratio(times, numerator, denominator, scale=1.0):
    """Ratio of medians, with each round's own ratio beside it."""
    return {
        "ratio": median(times[numerator]) / (scale * median(times[denominator])),
        "rounds": [
            n / (scale * d)
            for n, d in zip(
                round_medians(times[numerator]), round_medians(times[denominator])
            )
        ],
    }


def paired_difference(times, a, b):
    """Median over rounds of (round median of a − round median of b)."""
    diffs = [x - y for x, y in zip(round_medians(times[a]), round_medians(times[b]))]
    return {"seconds": float(np.median(diffs)), "rounds": diffs}


def safe_ratio(numerator, denominator):
    """`None` when the denominator is not positive (tiny runs' allocator deltas)."""
    return numerator / denominator if denominator > 0 else None


def fmt_ratio(value):
    return "–" if value is None else f"{value:.2f}"


def markdown(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(seconds):
    return f"{1000 * seconds:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def fmt_s(seconds):
    return f"{seconds:,.2f} s"


# -------------------------------------------------------------------- data
def synthetic_data(n, shape, seed):
    """Learnable images (class j brightens a band of rows) with 40% sym. noise."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, NUM_CLASSES, n)
    images = rng.integers(0, 128, (n, *shape), dtype=np.uint8)
    band = max(1, shape[0] // NUM_CLASSES)
    for j in range(NUM_CLASSES):
        row = (j * band) % shape[0]
        images[clean == j, row : row + band] += 100
    flip = rng.random(n) < NOISE_RATE
    noisy = np.where(
        flip, (clean + rng.integers(1, NUM_CLASSES, n)) % NUM_CLASSES, clean
    )
    return images, noisy.astype(np.int64), clean.astype(np.int64)


def fixed_stream(images, labels, batch_size, count=8):
    """An endless dataset cycling over `count` CDAS batch pairs held in memory."""
    sampler = sampling.CDASSampler(labels, batch_size, num_classes=NUM_CLASSES)
    paired = sampling.paired_dataset(sampler, images, labels, start_step=0)
    elements = list(paired.take(count))
    stacked = {k: tf.stack([e[k] for e in elements]) for k in elements[0]}
    return tf.data.Dataset.from_tensor_slices(stacked).repeat().prefetch(2)


def sgd():
    """The paper's optimiser (§4.1.2), at a constant learning rate."""
    return optimizers.SGD(0.02, momentum=0.9, weight_decay=5e-4)


def build_gal(backbone, student=None, jit_compile=False, whole_step=True, **options):
    keras.utils.set_random_seed(0)
    gal = GAL(
        backbone.build("twin_a"),
        backbone.build("twin_b"),
        (student or backbone).build("student"),
        tau=TAU,
        **options,
    )
    gal.compile(optimizer=sgd(), jit_compile=jit_compile)
    if not whole_step:
        gal.jit_compile = False  # the passes only, as under a strategy
    return gal


def build_keras_ce(backbone):
    keras.utils.set_random_seed(0)
    net = backbone.build("ce")
    net.compile(
        optimizer=sgd(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return net


def wait(logs):
    """Fetches one output, so a call's time includes its whole step."""
    next(iter(logs.values())).numpy()


class Bench:
    """One backbone's contenders, sharing one data set and one fixed batch stream."""

    def __init__(self, backbone, batch_size, num_images):
        self.backbone = backbone
        self.batch_size = batch_size
        self.images, self.labels, self.clean = synthetic_data(
            num_images, backbone.image_shape, seed=0
        )
        val_images, _, val_labels = synthetic_data(
            num_images // 4, backbone.image_shape, seed=1
        )
        self.validation = sampling.evaluation_dataset(
            val_images, val_labels, batch_size
        )
        self.training_set = TrainingSet(
            self.images,
            self.labels,
            batch_size=batch_size,
            clean_labels=self.clean,
            num_classes=NUM_CLASSES,
        )
        self.stream = fixed_stream(self.images, self.labels, batch_size)
        self.models = {}
        self.steppers = {}
        self.trace_seconds = {}

    @property
    def steps_per_epoch(self):
        return self.training_set.steps_per_epoch

    def model(self, contender):
        if contender not in self.models:
            if contender == "ce_keras":
                model = build_keras_ce(self.backbone)
            else:
                model = build_gal(self.backbone, **GAL_OPTIONS[contender])
                # What GAL.fit does before its first step.
                model._build_optimizers()
                model.enter_epoch(0)
                if model.train_student:
                    model.refresh_pseudo_labels(self.training_set)
            model.make_train_function(force=True)
            self.models[contender] = model
        return self.models[contender]

    def stepper(self, contender):
        """A zero-argument call running one train step of `contender`."""
        if contender not in self.steppers:
            model = self.model(contender)
            stream = self.stream
            if contender == "ce_keras":
                stream = stream.map(lambda b: (b["image_a"], b["label_a"]))
            iterator = iter(stream)

            def step():
                wait(model.train_function(iterator))

            start = time.perf_counter()
            step()  # traces (and XLA-compiles the agreement)
            self.trace_seconds[contender] = time.perf_counter() - start
            self.steppers[contender] = step
        return self.steppers[contender]

    def ce_epoch(self):
        step = self.stepper("ce")
        for _ in range(self.steps_per_epoch):
            step()

    def gal_epoch(self):
        step = self.stepper("gal")
        for _ in range(self.steps_per_epoch):
            step()

    def refresh(self, contender):
        model = self.model(contender)
        return lambda: model.refresh_pseudo_labels(self.training_set)

    def evaluate(self, contender):
        model = self.model(contender)
        return lambda: model.evaluate(self.validation, verbose=0)

    def forward(self, contender, batch_size):
        """The refresh's floor: θA's and θB's plain inference calls over the N
        images already in memory as float32 batches, nothing written back."""
        model = self.model(contender)
        images = tf.constant(self.images, tf.float32)
        batches = [
            images[i : i + batch_size] for i in range(0, len(self.images), batch_size)
        ]
        networks = (model.twin_a, model.twin_b)
        passes = tf.function(
            lambda x: [net(x, training=False) for net in networks],
            reduce_retracing=True,
        )
        return lambda: [passes(batch)[-1].numpy() for batch in batches]


def agreement_call(variables, seed=0, granularity="variable"):
    """`agreement_coefficients` + `agreement_gates` at `granularity`, on random
    gradients of these shapes."""
    generator = tf.random.Generator.from_seed(seed)
    grads_a = [generator.normal(v.shape) for v in variables]
    grads_b = [generator.normal(v.shape) for v in variables]
    fn = tf.function(
        lambda a, b: agreement.agreement_gates(
            agreement.agreement_coefficients(a, b, granularity), TAU
        )
    )
    return lambda: fn(grads_a, grads_b)[0].numpy()


def apply_calls(gal, granularities=("variable",)):
    """θB's optimizer applying zero gradients: directly, and through the `skip`
    update (`GatedUpdate`) with every gate closed and with every gate open. The
    closed gates have each granularity's shapes (`apply_skip_closed` for
    `variable`, `apply_skip_closed_<granularity>` for the others)."""
    variables = gal.twin_b.trainable_variables
    update = GatedUpdate(gal.optimizer_b, variables, gal.twins_loss_scale)
    zeros = [tf.zeros(v.shape, v.dtype) for v in variables]

    def gates(value, granularity):
        shapes = agreement.unit_shapes([v.shape for v in variables], granularity)
        return [tf.fill(s, value) for s in shapes]

    @tf.function
    def plain(grads):
        gal.optimizer_b.apply(grads, variables)
        return gal.optimizer_b.iterations.value

    @tf.function
    def gated(grads, gates):
        update.apply(grads, gates)
        return gal.optimizer_b.iterations.value

    def call(value, granularity):
        fixed = gates(value, granularity)
        return lambda: gated(zeros, fixed).numpy()

    calls = {
        "apply": lambda: plain(zeros).numpy(),
        "apply_skip_closed": call(False, "variable"),
        "apply_skip_open": call(True, "variable"),
    }
    for granularity in granularities:
        if granularity != "variable":
            calls[f"apply_skip_closed_{granularity}"] = call(False, granularity)
    return calls


def parameter_count(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


# -------------------------------------------------------------- part 1
def part_step(settings, benches):
    result = {"backbones": {}}
    rows = []
    for backbone in settings.step_backbones:
        bench = benches[backbone.kind]
        steps = settings.steps[backbone.kind]
        # --tiny (the test suite's) leaves out the XLA contenders, whose compiles
        # dominate its time; benchmarks/gpu_check.py --tiny runs XLA steps.
        names = [n for n in STEP_CONTENDERS if not (FLAGS.tiny and "xla" in n)]
        contenders = {name: (bench.stepper(name), steps) for name in names}
        twins = bench.model("twins")
        twin_variables = twins.twin_a.trainable_variables
        isolated = {"agreement": agreement_call(twin_variables)}
        for granularity in agreement.GRANULARITIES[1:]:
            isolated[f"agreement_{granularity}"] = agreement_call(
                twin_variables, granularity=granularity
            )
        isolated.update(apply_calls(twins, agreement.GRANULARITIES))
        for name, fn in isolated.items():
            fn()  # traces, XLA-compiles
            contenders[name] = (fn, 5 * steps)
        times = side_by_side(contenders, settings.rounds, settings.warmup_steps)
        seconds = {name: median(t) for name, t in times.items()}
        skip_overhead = paired_difference(times, "apply_skip_closed", "apply")
        gating = seconds["agreement"] + skip_overhead["seconds"]
        # The same share at each agreement granularity (the twins' step itself
        # is timed at `variable`; only the cosine and the select differ).
        by_granularity = {}
        for granularity in agreement.GRANULARITIES:
            suffix = "" if granularity == "variable" else f"_{granularity}"
            restore = paired_difference(times, f"apply_skip_closed{suffix}", "apply")
            seconds_g = seconds[f"agreement{suffix}"] + restore["seconds"]
            by_granularity[granularity] = {
                "agreement_seconds": seconds[f"agreement{suffix}"],
                "skip_restore_all_closed_seconds": restore,
                "agreement_gating_seconds": seconds_g,
                "ratio_over_twins": seconds_g / seconds["twins"],
            }
        ratios = {
            "twins_over_ce": ratio(times, "twins", "ce"),
            "gal_over_ce": ratio(times, "gal", "ce"),
            "gal_warmup_over_ce": ratio(times, "gal_warmup", "ce"),
            "ce_over_ce_keras": ratio(times, "ce", "ce_keras"),
            **{
                f"{name}_over_gal": ratio(times, name, "gal")
                for name in ("gal_xla_passes", "gal_xla")
                if name in times
            },
            "twins_all_over_ce": ratio(times, "twins_all", "ce"),
            "agreement_gating_over_twins": {
                "ratio": gating / seconds["twins"],
                "rounds": [
                    (a + s - p) / t
                    for a, s, p, t in zip(
                        *(
                            round_medians(times[k])
                            for k in (
                                "agreement",
                                "apply_skip_closed",
                                "apply",
                                "twins",
                            )
                        )
                    )
                ],
            },
        }
        result["backbones"][backbone.kind] = {
            "backbone": dataclasses.asdict(backbone),
            "parameters_per_network": parameter_count(twins.twin_a),
            "batch_size": settings.batch_size,
            "seconds": seconds,
            "round_medians": {name: round_medians(t) for name, t in times.items()},
            "calls_per_round": {name: c for name, (_, c) in contenders.items()},
            "trace_seconds": dict(bench.trace_seconds),
            "agreement_gating_seconds": gating,
            "agreement_gating_by_granularity": by_granularity,
            "skip_restore_all_closed_seconds": skip_overhead,
            "twins_minus_twins_all_seconds": paired_difference(
                times, "twins", "twins_all"
            ),
            "zero_grad_minus_twins_all_seconds": paired_difference(
                times, "twins_zero_grad", "twins_all"
            ),
            "ratios": ratios,
        }
        rows += [
            [
                backbone.label,
                fmt_ms(seconds["ce_keras"]),
                fmt_ms(seconds["ce"]),
                fmt_ms(seconds["gal_warmup"]),
                fmt_ms(seconds["twins"]),
                fmt_ms(seconds["gal"]),
                fmt_ms(seconds.get("gal_xla_passes", float("nan"))),
                fmt_ms(seconds.get("gal_xla", float("nan"))),
                f"{ratios['twins_over_ce']['ratio']:.2f} (≤ 2.05)",
                f"{ratios['gal_over_ce']['ratio']:.2f} (≤ 3.1)",
                fmt_ms(seconds["agreement"]),
                fmt_ms(skip_overhead["seconds"]),
                f"{100 * ratios['agreement_gating_over_twins']['ratio']:.2f}% (≤ 3%)",
                " / ".join(
                    f"{100 * by_granularity[g]['ratio_over_twins']:.2f}%"
                    for g in agreement.GRANULARITIES
                ),
            ]
        ]
    table = markdown(
        [
            "backbone",
            "CE (Keras)",
            "CE (θA, GAL warm-up path)",
            "GAL warm-up (θA + θC)",
            "twins",
            "full GAL",
            "full GAL, XLA passes",
            "full GAL, XLA step",
            "twins / CE",
            "GAL / CE",
            "cosine + gates",
            "skip restore (all closed)",
            "agreement + gating / twins",
            "the same at variable / channel / element (≤ 3%)",
        ],
        rows,
    )
    return result, table


# -------------------------------------------------------------- part 2
def part_scaling(settings):
    contenders, info = {}, {}
    for backbone in settings.scaling_backbones:
        # The student is irrelevant here: the smallest network keeps memory down.
        gal = build_gal(
            backbone,
            student=Backbone("small_cnn", backbone.image_shape, 4),
            warmup_epochs=0,
        )
        gal._build_optimizers()
        calls = {"agreement": agreement_call(gal.twin_a.trainable_variables)}
        calls.update(apply_calls(gal))
        del calls["apply_skip_open"]
        for name, fn in calls.items():
            fn()
            contenders[f"{backbone.label}/{name}"] = (fn, settings.scaling_calls)
        info[backbone.label] = {
            "backbone": dataclasses.asdict(backbone),
            "parameters": parameter_count(gal.twin_a),
            "variables": len(gal.twin_a.trainable_variables),
        }
    times = side_by_side(contenders, settings.rounds, settings.warmup_steps)
    rows = []
    for label, entry in info.items():
        agree = median(times[f"{label}/agreement"])
        restore = paired_difference(
            times, f"{label}/apply_skip_closed", f"{label}/apply"
        )
        entry.update(
            agreement_seconds=agree,
            apply_seconds=median(times[f"{label}/apply"]),
            skip_restore_all_closed_seconds=restore,
            agreement_ns_per_parameter=1e9 * agree / entry["parameters"],
            agreement_gating_seconds=agree + restore["seconds"],
        )
        rows.append(
            [
                label,
                f"{entry['parameters'] / 1e6:.2f} M",
                entry["variables"],
                fmt_ms(agree),
                f"{entry['agreement_ns_per_parameter']:.2f}",
                fmt_ms(restore["seconds"]),
                fmt_ms(entry["apply_seconds"]),
            ]
        )
    params = np.array([e["parameters"] for e in info.values()], float)
    agree = np.array([e["agreement_seconds"] for e in info.values()])
    total = np.array([e["agreement_gating_seconds"] for e in info.values()])
    large = params >= 1e6
    fit = {
        "agreement_slope_all": float(np.polyfit(np.log(params), np.log(agree), 1)[0]),
        "agreement_gating_slope_all": float(
            np.polyfit(np.log(params), np.log(np.maximum(total, 1e-9)), 1)[0]
        ),
    }
    if large.sum() >= 2:
        fit["agreement_slope_resnets"] = float(
            np.polyfit(np.log(params[large]), np.log(agree[large]), 1)[0]
        )
        fit["agreement_gating_slope_resnets"] = float(
            np.polyfit(
                np.log(params[large]), np.log(np.maximum(total[large], 1e-9)), 1
            )[0]
        )
    slope = fit.get("agreement_slope_resnets", fit["agreement_slope_all"])
    fit["no_faster_than_linear"] = bool(slope <= TARGETS["agreement_scaling_slope"])
    if len(params) >= 3:
        # The cosine costs per scalar and per variable (one reduction each):
        # t ≈ c0 + c_param·P + c_variable·V, least squares.
        variables = np.array([e["variables"] for e in info.values()], float)
        design = np.stack([np.ones_like(params), params, variables], axis=1)
        coef = np.linalg.lstsq(design, agree, rcond=None)[0]
        fit["agreement_linear_model"] = {
            "seconds": float(coef[0]),
            "ns_per_parameter": float(1e9 * coef[1]),
            "us_per_variable": float(1e6 * coef[2]),
            "relative_residuals": [float(r) for r in (design @ coef - agree) / agree],
        }
    table = markdown(
        [
            "backbone",
            "parameters",
            "variables",
            "cosine + gates",
            "ns / parameter",
            "skip restore (all closed)",
            "optimizer apply (reference)",
        ],
        rows,
    )
    table += "\n\n" + ", ".join(
        f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}"
        for k, v in fit.items()
        if k != "agreement_linear_model"
    )
    if "agreement_linear_model" in fit:
        model = fit["agreement_linear_model"]
        table += (
            f"; least squares t ≈ {fmt_ms(model['seconds'])} + "
            f"{model['ns_per_parameter']:.2f} ns × parameters + "
            f"{model['us_per_variable']:.1f} µs × variables (largest residual "
            f"{100 * max(map(abs, model['relative_residuals'])):.0f}%)"
        )
    return {"backbones": info, "fit": fit}, table


# -------------------------------------------------------------- part 3
def part_refresh(settings, benches):
    result = {"backbones": {}}
    rows = []
    arithmetic_rows = []
    for backbone in settings.step_backbones:
        bench = benches[backbone.kind]
        refresh_size = teacher.refresh_batch_size(settings.batch_size)
        contenders = {
            "ce_epoch": (bench.ce_epoch, 1),
            "refresh_warmup": (bench.refresh("ce"), 1),
            "refresh_split": (bench.refresh("gal"), 1),
            "forward_twins": (bench.forward("gal", refresh_size), 1),
            "eval_warmup": (bench.evaluate("ce"), 1),
            "eval_split": (bench.evaluate("gal"), 1),
            "matmul": (arithmetic.matmul_call(settings.matmul_size), 1),
        }
        for fn, _ in contenders.values():
            fn()  # traces the refresh and test functions
        times = side_by_side(contenders, settings.rounds, warmup=0)
        seconds = {name: median(t) for name, t in times.items()}
        ratios = {
            "refresh_per_network_over_ce_epoch": ratio(
                times, "refresh_split", "ce_epoch", scale=2.0
            ),
            "refresh_split_over_ce_epoch": ratio(times, "refresh_split", "ce_epoch"),
            "refresh_warmup_over_ce_epoch": ratio(times, "refresh_warmup", "ce_epoch"),
            "refresh_split_over_forward": ratio(
                times, "refresh_split", "forward_twins"
            ),
            "forward_per_network_over_ce_epoch": ratio(
                times, "forward_twins", "ce_epoch", scale=2.0
            ),
        }
        figures = arithmetic.refresh_arithmetic(
            arithmetic.forward_flops(bench.model("gal").twin_a),
            bench.training_set.num_examples,
            settings.matmul_size,
            seconds,
        )
        result["backbones"][backbone.kind] = {
            "num_images": bench.training_set.num_examples,
            "validation_images": (bench.training_set.num_examples // 4),
            "batch_size": settings.batch_size,
            "refresh_batch_size": refresh_size,
            "steps_per_epoch": bench.steps_per_epoch,
            "seconds": seconds,
            "round_seconds": {name: round_medians(t) for name, t in times.items()},
            "ratios": ratios,
            "arithmetic": figures,
        }
        r = ratios["refresh_per_network_over_ce_epoch"]["ratio"]
        rows.append(
            [
                f"{backbone.label}, N = {bench.training_set.num_examples:,}",
                fmt_s(seconds["ce_epoch"]),
                fmt_s(seconds["refresh_warmup"]),
                fmt_s(seconds["refresh_split"]),
                f"{ratios['refresh_split_over_ce_epoch']['ratio']:.2f}",
                f"{r:.2f} (≤ 0.15)",
                f"{ratios['forward_per_network_over_ce_epoch']['ratio']:.2f}",
                f"{ratios['refresh_split_over_forward']['ratio']:.2f}",
                fmt_s(seconds["eval_warmup"]),
                fmt_s(seconds["eval_split"]),
            ]
        )
        arithmetic_rows.append(
            [
                backbone.label,
                f"{figures['forward_mflop_per_image']:.1f}",
                f"{figures['forward_gflops']:.0f}",
                f"{figures['ce_epoch_gflops']:.0f}",
                f"{figures['matmul_gflops']:.0f}",
                f"{figures['refresh_per_network_over_ce_epoch_at_peak']:.2f}",
            ]
        )
    table = markdown(
        [
            "backbone",
            "CE epoch",
            "refresh, θA (warm-up)",
            "refresh, θA+θB",
            "refresh θA+θB / CE epoch",
            "per network",
            "forward pass alone, per network",
            "refresh / forward",
            "eval, warm-up",
            "eval, after split",
        ],
        rows,
    )
    table += "\n\nArithmetic (GFLOP/s: 10⁹ floating-point operations per second)\n\n"
    table += markdown(
        [
            "backbone",
            "forward MFLOP / image",
            "forward GFLOP/s",
            "CE epoch GFLOP/s (3 × forward)",
            "matmul GFLOP/s (peak)",
            "per network / CE epoch, forward at peak",
        ],
        arithmetic_rows,
    )
    return result, table


# -------------------------------------------------------------- part 4
def floor_seconds(step_warm, step_gal, refresh, evaluation, steps, epochs, warmup):
    """The schedule's floor; `refresh`, `evaluation`: (warm-up, after split)."""
    warm = warmup * (steps * step_warm + refresh[0] + evaluation[0])
    agree = (epochs - warmup) * (steps * step_gal + refresh[1] + evaluation[1])
    no_eval = warm + agree - warmup * evaluation[0] - (epochs - warmup) * evaluation[1]
    return {"with_evaluation": warm + agree, "without_evaluation": no_eval}


def schedule_floors(step, refresh, evaluation, steps, epochs, warmup):
    """The floors of the whole-run schedule from measured parts.

    `step`: seconds of the `ce`, `gal_warmup` and `gal` steps; `refresh`,
    `evaluation`: seconds with θA alone (`warmup`) and after the split (`split`).
    Returns the GAL floor, the GAL floor with CE-priced warm-up epochs (θC not
    trained in warm-up), and the floor of CE as galkeras runs it (W = E).
    """
    gal_parts = (
        (refresh["warmup"], refresh["split"]),
        (evaluation["warmup"], evaluation["split"]),
    )
    ce_parts = ((refresh["warmup"],) * 2, (evaluation["warmup"],) * 2)
    return {
        "gal": floor_seconds(
            step["gal_warmup"], step["gal"], *gal_parts, steps, epochs, warmup
        ),
        "gal_ce_warmup": floor_seconds(
            step["ce"], step["gal"], *gal_parts, steps, epochs, warmup
        ),
        "ce_gal": floor_seconds(
            step["ce"], step["ce"], *ce_parts, steps, epochs, epochs
        ),
    }


class RunProfile(keras.callbacks.Callback):
    """Where a `fit`'s wall time goes, from callback timestamps.

    `GAL.fit` puts its driver first, so this callback's `on_epoch_begin` comes
    after the pseudo-label refresh: the gap between two epochs is the refresh
    (plus the phase switch and Keras' metric reset). `steps` is the sum of the
    `train_function` calls, `loop` the rest of the training loop (callbacks,
    Python), `evaluation` the per-epoch validation, and `teardown` the time from
    `on_train_end` until `fit` returns (Keras' locals freed, among them the
    training data iterator).
    """

    def __init__(self):
        super().__init__()
        self.created = time.perf_counter()
        self.epochs = []

    def on_train_begin(self, logs=None):
        self.train_begin = self.last = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        now = time.perf_counter()
        self.epoch = {"between_epochs": now - self.last, "begin": now, "steps": []}

    def on_train_batch_begin(self, batch, logs=None):
        self.batch_begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.epoch["steps"].append(time.perf_counter() - self.batch_begin)

    def on_test_begin(self, logs=None):
        self.test_begin = time.perf_counter()

    def on_test_end(self, logs=None):
        self.epoch["evaluation"] = time.perf_counter() - self.test_begin

    def on_epoch_end(self, epoch, logs=None):
        self.last = time.perf_counter()
        e = self.epoch
        e["loop"] = self.last - e.pop("begin") - sum(e["steps"]) - e["evaluation"]
        self.epochs.append(e)

    def on_train_end(self, logs=None):
        self.train_end = time.perf_counter()

    def summary(self):
        """Seconds: the whole `fit` (`wall`) and its parts, summed over epochs."""
        wall = time.perf_counter() - self.created
        steps = [e["steps"] for e in self.epochs]
        parts = {
            "before_training": self.train_begin - self.created,
            "between_epochs": sum(e["between_epochs"] for e in self.epochs),
            "steps": float(sum(sum(s) for s in steps)),
            "first_step_of_each_epoch": float(sum(s[0] for s in steps)),
            "step_median_per_epoch": [float(np.median(s)) for s in steps],
            "loop": sum(e["loop"] for e in self.epochs),
            "evaluation": sum(e["evaluation"] for e in self.epochs),
            "evaluation_per_epoch": [e["evaluation"] for e in self.epochs],
            "between_epochs_per_epoch": [e["between_epochs"] for e in self.epochs],
            "teardown": wall - (self.train_end - self.created),
        }
        return {"wall": wall, "parts": parts}


def part_run(settings, benches, step_result, refresh_result):
    bench = benches["small_cnn"]
    backbone = bench.backbone
    bs, epochs, warmup = (
        settings.batch_size,
        settings.run_epochs,
        settings.run_warmup_epochs,
    )
    shape = backbone.image_shape
    aug = augment.make_augment("crop_flip", shape)
    steps = bench.steps_per_epoch

    def gal_run(**options):
        gal = build_gal(backbone, **options)
        training_set = TrainingSet(
            bench.images,
            bench.labels,
            batch_size=bs,
            augment=aug,
            clean_labels=bench.clean,
            num_classes=NUM_CLASSES,
        )
        profile = RunProfile()
        gal.fit(
            training_set,
            epochs=epochs,
            validation_data=bench.validation,
            callbacks=[profile],
            verbose=0,
        )
        return profile.summary()

    def keras_run():
        net = build_keras_ce(backbone)
        data = tf.data.Dataset.from_tensor_slices((bench.images, bench.labels))
        data = data.shuffle(len(bench.labels), seed=0).batch(bs, drop_remainder=True)
        data = data.enumerate().map(
            lambda step, xy: (
                aug(tf.cast(xy[0], tf.float32), tf.stack([0, step])),
                xy[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        data = data.prefetch(tf.data.AUTOTUNE)
        profile = RunProfile()
        net.fit(
            data,
            epochs=epochs,
            validation_data=bench.validation,
            callbacks=[profile],
            shuffle=False,
            verbose=0,
        )
        return profile.summary()

    runs = {
        "gal": lambda: gal_run(warmup_epochs=warmup),
        "ce_gal": lambda: gal_run(warmup_epochs=epochs, train_student=False),
        "ce_keras": keras_run,
    }
    floor_parts = {
        "step_ce": bench.stepper("ce"),
        "step_gal_warmup": bench.stepper("gal_warmup"),
        "step_gal": bench.stepper("gal"),
        "refresh_warmup": bench.refresh("ce"),
        "refresh_split": bench.refresh("gal"),
        "eval_warmup": bench.evaluate("ce"),
        "eval_split": bench.evaluate("gal"),
    }
    for fn in floor_parts.values():
        fn()
    walls = {name: [] for name in runs}
    profiles = {name: [] for name in runs}
    same_round = []
    names = list(runs)
    for r in range(settings.run_rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            profiles[name].append(runs[name]())
            walls[name].append(profiles[name][-1]["wall"])
        parts = side_by_side(
            {
                k: (fn, steps if k.startswith("step") else 1)
                for k, fn in floor_parts.items()
            },
            rounds=1,
            warmup=1,
        )
        p = {k: median(t) for k, t in parts.items()}
        same_round.append(
            {
                "parts": p,
                **schedule_floors(
                    {k: p[f"step_{k}"] for k in ("ce", "gal_warmup", "gal")},
                    {k: p[f"refresh_{k}"] for k in ("warmup", "split")},
                    {k: p[f"eval_{k}"] for k in ("warmup", "split")},
                    steps,
                    epochs,
                    warmup,
                ),
            }
        )
    wall = {name: float(np.median(w)) for name, w in walls.items()}
    result = {
        "backbone": dataclasses.asdict(backbone),
        "num_images": bench.training_set.num_examples,
        "validation_images": bench.training_set.num_examples // 4,
        "batch_size": bs,
        "epochs": epochs,
        "warmup_epochs": warmup,
        "augment": "crop_flip",
        "wall_seconds": wall,
        "wall_rounds": walls,
        "profiles": profiles,
        "floor_same_round": same_round,
        "train_function_trace_seconds": {
            k: bench.trace_seconds[k] for k in ("ce", "gal_warmup", "gal")
        },
    }
    ratios = {
        "gal_over_ce_gal": wall["gal"] / wall["ce_gal"],
        "gal_over_ce_keras": wall["gal"] / wall["ce_keras"],
        "paper_gal_over_ce": PAPER_GAL_OVER_CE,
        "gal_wall_over_floor_same_round": float(
            np.median(
                [
                    w / f["gal"]["with_evaluation"]
                    for w, f in zip(walls["gal"], same_round)
                ]
            )
        ),
        "ce_gal_wall_over_floor_same_round": float(
            np.median(
                [
                    w / f["ce_gal"]["with_evaluation"]
                    for w, f in zip(walls["ce_gal"], same_round)
                ]
            )
        ),
    }
    floor = None
    if step_result and refresh_result:
        s = step_result["backbones"]["small_cnn"]["seconds"]
        f = refresh_result["backbones"]["small_cnn"]["seconds"]
        floor = schedule_floors(
            s,
            {k: f[f"refresh_{k}"] for k in ("warmup", "split")},
            {k: f[f"eval_{k}"] for k in ("warmup", "split")},
            steps,
            epochs,
            warmup,
        )
        gal_floor = floor["gal"]["with_evaluation"]
        ratios["gal_wall_over_floor"] = wall["gal"] / gal_floor
        ratios["gal_wall_over_floor_ce_warmup"] = (
            wall["gal"] / floor["gal_ce_warmup"]["with_evaluation"]
        )
        ratios["gal_wall_without_teardown_over_floor"] = float(
            np.median(
                [
                    (p["wall"] - p["parts"]["teardown"]) / gal_floor
                    for p in profiles["gal"]
                ]
            )
        )
        ratios["ce_gal_wall_over_floor"] = (
            wall["ce_gal"] / floor["ce_gal"]["with_evaluation"]
        )
    result["floor_from_parts_1_3"] = floor
    result["ratios"] = ratios

    def floor_cell(name):
        if floor is None:
            return "–"
        return fmt_s(floor[name]["with_evaluation"])

    same = {
        name: float(np.median([f[name]["with_evaluation"] for f in same_round]))
        for name in ("gal", "ce_gal")
    }
    rows = [
        [
            f"GAL (W = {warmup})",
            fmt_s(wall["gal"]),
            floor_cell("gal"),
            f"{ratios.get('gal_wall_over_floor', float('nan')):.2f} (≤ 1.10)",
            fmt_s(same["gal"]),
            f"{ratios['gal_wall_over_floor_same_round']:.2f} (≤ 1.10)",
        ],
        [
            "CE, galkeras (`GAL`, W = E, no θC)",
            fmt_s(wall["ce_gal"]),
            floor_cell("ce_gal"),
            f"{ratios.get('ce_gal_wall_over_floor', float('nan')):.2f}",
            fmt_s(same["ce_gal"]),
            f"{ratios['ce_gal_wall_over_floor_same_round']:.2f}",
        ],
        ["CE, plain Keras", fmt_s(wall["ce_keras"]), "–", "–", "–", "–"],
    ]
    table = markdown(
        [
            "run",
            "wall",
            "floor (parts 1-3)",
            "wall / floor",
            "floor (same round)",
            "wall / same-round floor",
        ],
        rows,
    )
    profile_keys = (
        "before_training",
        "first_step_of_each_epoch",
        "steps",
        "loop",
        "between_epochs",
        "evaluation",
        "teardown",
    )
    profile_rows = []
    for name, label in (
        ("gal", "GAL"),
        ("ce_gal", "CE, galkeras"),
        ("ce_keras", "CE, Keras"),
    ):
        cells = [
            float(np.median([prof["parts"][k] for prof in profiles[name]]))
            for k in profile_keys
        ]
        # `steps` includes the first step of each epoch; show the rest apart.
        cells[2] -= cells[1]
        profile_rows.append([label, fmt_s(wall[name]), *(fmt_s(c) for c in cells)])
    table += "\n\nWhere the wall time goes (medians over rounds):\n\n" + markdown(
        [
            "run",
            "wall",
            "set-up",
            "first step of each epoch",
            "other steps",
            "training loop",
            "between epochs (refresh)",
            "evaluation",
            "teardown",
        ],
        profile_rows,
    )
    if floor is not None:
        table += (
            "\n\nGAL without the teardown: wall / floor = "
            f"{ratios['gal_wall_without_teardown_over_floor']:.2f}. With CE "
            "warm-up epochs (θC not trained in warm-up) the floor would be "
            f"{fmt_s(floor['gal_ce_warmup']['with_evaluation'])} (wall / floor "
            f"{ratios['gal_wall_over_floor_ce_warmup']:.2f})."
        )
    table += (
        f"\n\nGAL / CE (galkeras) = {ratios['gal_over_ce_gal']:.2f}, "
        f"GAL / CE (Keras) = {ratios['gal_over_ce_keras']:.2f}; "
        f"paper (Table 6, V100) = {PAPER_GAL_OVER_CE}."
    )
    return result, table


# -------------------------------------------------------------- part 5
def rss_bytes(field):
    """`VmRSS` (now) or `VmHWM` (peak) of this process, from /proc/self/status.

    Not `getrusage`: its `ru_maxrss` carries the parent's peak over the exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}.")


def reset_peak_rss():
    """Sets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_probe(config):
    """Runs in a fresh process: one contender's peak memory.

    The window starts once the data and the batch stream exist and before any
    model is built; it covers building, the first (tracing) step and
    `config["steps"]` more steps.
    """
    backbone = Backbone(
        **{
            **config["backbone"],
            "image_shape": tuple(config["backbone"]["image_shape"]),
        }
    )
    bench = Bench(backbone, config["batch_size"], config["num_images"])
    cpu = "CPU:0"
    tf.config.experimental.reset_memory_stats(cpu)
    base_alloc = tf.config.experimental.get_memory_info(cpu)["current"]
    reset_peak_rss()
    base_rss = rss_bytes("VmRSS")
    step = bench.stepper(config["contender"])  # builds, prepares and traces
    build_peak = tf.config.experimental.get_memory_info(cpu)["peak"]
    tf.config.experimental.reset_memory_stats(cpu)
    for _ in range(config["steps"]):
        step()
    info = tf.config.experimental.get_memory_info(cpu)
    model = bench.model(config["contender"])
    result = {
        "allocator_peak_bytes": info["peak"] - base_alloc,
        "allocator_peak_with_build_bytes": max(info["peak"], build_peak) - base_alloc,
        "allocator_after_bytes": info["current"] - base_alloc,
        "rss_peak_bytes": rss_bytes("VmHWM") - base_rss,
        "weights_bytes": int(
            sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights)
        ),
    }
    print("MEMORY_PROBE " + json.dumps(result), flush=True)


def run_memory_probe(config):
    completed = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            f"--memory_probe={json.dumps(config)}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        check=False,
    )
    prefix = "MEMORY_PROBE "
    lines = [line for line in completed.stdout.splitlines() if line.startswith(prefix)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe {config} failed:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1][len(prefix) :])


def part_memory(settings):
    result = {
        "method": (
            "one fresh subprocess per contender. allocator_peak: TensorFlow's CPU "
            "allocator (tf.config.experimental.get_memory_info('CPU:0')), peak "
            f"over {settings.memory_steps} train steps after the first (tracing) "
            "one, minus the bytes in use before any model was built (weights, "
            "optimizer slots and the pseudo-label table included). rss_peak: the "
            "process's peak RSS (VmHWM, reset through /proc/self/clear_refs) from "
            "before the models were built to the end (building, tracing, XLA "
            "compilation and steps), minus the RSS at that point"
        ),
        "backbones": {},
    }
    configs = [
        {
            "backbone": dataclasses.asdict(backbone),
            "batch_size": settings.batch_size,
            "num_images": settings.images[backbone.kind],
            "contender": contender,
            "steps": settings.memory_steps,
        }
        for backbone in settings.memory_backbones
        for contender in settings.memory_contenders
    ]
    # Two probes at a time: each measures only its own process.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        probes = list(pool.map(run_memory_probe, configs))
    rows = []
    for backbone in settings.memory_backbones:
        entry = {
            config["contender"]: probe
            for config, probe in zip(configs, probes)
            if config["backbone"]["kind"] == backbone.kind
        }
        ratios = {}
        for name in ("twins", "gal", "ce"):
            if name in entry and "ce_keras" in entry and name != "ce_keras":
                for key in ("allocator_peak_bytes", "rss_peak_bytes"):
                    ratios[f"{name}_over_ce_keras_{key[:-6]}"] = safe_ratio(
                        entry[name][key], entry["ce_keras"][key]
                    )
        result["backbones"][backbone.kind] = {"contenders": entry, "ratios": ratios}
        base = entry["ce_keras"]
        for contender, m in entry.items():
            rows.append(
                [
                    backbone.label,
                    contender,
                    f"{m['weights_bytes'] / 2**20:,.1f}",
                    f"{m['allocator_peak_bytes'] / 2**20:,.1f}",
                    fmt_ratio(
                        safe_ratio(
                            m["allocator_peak_bytes"], base["allocator_peak_bytes"]
                        )
                    ),
                    f"{m['rss_peak_bytes'] / 2**20:,.1f}",
                    fmt_ratio(safe_ratio(m["rss_peak_bytes"], base["rss_peak_bytes"])),
                ]
            )
    table = markdown(
        [
            "backbone",
            "contender",
            "weights, MiB",
            "allocator peak, MiB",
            "/ CE (Keras)",
            "peak RSS delta, MiB",
            "/ CE (Keras)",
        ],
        rows,
    )
    return result, table


# -------------------------------------------------------------- part 6
def table6_dataset(directory, settings):
    """Writes the runs' data set and returns its `npz:` spec.

    The labels are clean: the harness adds the 50% symmetric noise, as it does
    to CIFAR-10.
    """
    n, shape = settings.table6_images, settings.table6_image_shape
    images, _, labels = synthetic_data(n, shape, seed=0)
    test_images, _, test_labels = synthetic_data(
        max(n // 4, NUM_CLASSES), shape, seed=1
    )
    path = os.path.join(directory, "table6.npz")
    np.savez(
        path, x_train=images, y_train=labels, x_test=test_images, y_test=test_labels
    )
    return f"npz:{path}"


def table6_config(settings, method, dataset, run_dir, dry_run=False):
    """The `TrainConfig` of `method`'s run, writing only under `run_dir`."""
    options = {}
    if method == "gal_split":  # GAL with --student_start=split
        method, options["student_start"] = "gal", "split"
    if method == "gal":
        options["warmup_epochs"] = settings.table6_warmup_epochs
    if method == "coteaching_plus":
        options["init_epoch"] = settings.table6_init_epoch
    return train.TrainConfig(
        method=method,
        dataset=dataset,
        noise_type="sym",
        noise_rate=0.5,
        backbone="small_cnn",
        backbone_width=settings.table6_width,
        augment="crop_flip",
        batch_size=settings.table6_batch_size,
        epochs=settings.table6_epochs,
        lr_decay_epochs=(),
        verbose=0,
        model_dir=os.path.join(run_dir, "run"),
        export_dir=os.path.join(run_dir, "export"),
        dry_run=dry_run,
        **options,
    )


def timed_run(config):
    """`train.run(config)`'s wall time in seconds, and its summary.

    Each run starts from a cleared Keras session, so that no run inherits the
    graphs and layer names of those before it.
    """
    keras.backend.clear_session()
    gc.collect()
    start = time.perf_counter()
    summary = train.run(config)
    return time.perf_counter() - start, summary


def rotated(names, shift):
    shift %= len(names)
    return names[shift:] + names[:shift]


def part_table6(settings):
    methods = TABLE6_METHODS
    walls = {m: [] for m in methods}
    per_epoch = {m: [] for m in methods}
    accuracy = {m: [] for m in methods}
    orders = []
    directory = tempfile.mkdtemp(prefix="galkeras-table6-")
    try:
        dataset = table6_dataset(directory, settings)

        def config(method, run, dry_run=False):
            run_dir = os.path.join(directory, f"{method}-{run}")
            return table6_config(settings, method, dataset, run_dir, dry_run)

        if settings.table6_dry_runs:
            # Pays the process's one-time costs (imports, kernels, first
            # traces), which would otherwise fall on the first timed run.
            for method in methods:
                timed_run(config(method, "warmup", dry_run=True))
        for r in range(settings.table6_rounds):
            orders.append(rotated(list(methods), r))
            for method in orders[-1]:
                run_config = config(method, r)
                wall, summary = timed_run(run_config)
                shutil.rmtree(os.path.dirname(run_config.model_dir))
                walls[method].append(wall)
                per_epoch[method].append(summary["seconds_per_epoch"])
                accuracy[method].append(summary[summary["reported_network"]]["last"])
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    def over_ce(values):
        return {
            m: {
                "ratio": float(np.median(values[m]) / np.median(values["ce"])),
                "rounds": [v / c for v, c in zip(values[m], values["ce"])],
            }
            for m in methods
        }

    wall_ratios, epoch_ratios = over_ce(walls), over_ce(per_epoch)
    paper = {
        m: {"hours": h, "over_ce": h / PAPER_TABLE6_HOURS["ce"]}
        for m, h in PAPER_TABLE6_HOURS.items()
    }
    paper["gal_split"] = paper["gal"]  # the paper's one GAL row
    result = {
        "run": {
            "dataset": "synthetic, learnable (class j brightens a band of rows)",
            "num_images": settings.table6_images,
            "test_images": max(settings.table6_images // 4, NUM_CLASSES),
            "image_shape": settings.table6_image_shape,
            "noise": "sym 50%, added by galkeras.train",
            "backbone": "small_cnn",
            "backbone_width": settings.table6_width,
            "augment": "crop_flip",
            "batch_size": settings.table6_batch_size,
            "epochs": settings.table6_epochs,
            "gal_warmup_epochs": settings.table6_warmup_epochs,
            "coteaching_plus_init_epoch": settings.table6_init_epoch,
            "rounds": settings.table6_rounds,
            "untimed_dry_runs_first": settings.table6_dry_runs,
        },
        "orders": orders,
        "methods": {
            m: {
                "wall_seconds": float(np.median(walls[m])),
                "wall_rounds": walls[m],
                "wall_over_ce": wall_ratios[m],
                "seconds_per_epoch": float(np.median(per_epoch[m])),
                "seconds_per_epoch_rounds": per_epoch[m],
                "seconds_per_epoch_over_ce": epoch_ratios[m],
                "last_test_accuracy_rounds": accuracy[m],
                "paper_hours": paper[m]["hours"],
                "paper_over_ce": paper[m]["over_ce"],
            }
            for m in methods
        },
        "paper": paper,
    }
    rows = []
    for m in [*PAPER_TABLE6_HOURS, "gal_split"]:
        label = METHOD_LABELS[m]
        if m.startswith("gal"):
            label += f" (W = {settings.table6_warmup_epochs})"
        if m == "coteaching_plus":
            label += f" (init_epoch = {settings.table6_init_epoch})"
        if m not in methods:
            rows.append([label, "not in galkeras", "–", "–", "–", "–"])
        else:
            rows.append(
                [
                    label,
                    fmt_s(result["methods"][m]["wall_seconds"]),
                    f"{wall_ratios[m]['ratio']:.2f}",
                    " / ".join(f"{v:.2f}" for v in wall_ratios[m]["rounds"]),
                    fmt_s(result["methods"][m]["seconds_per_epoch"]),
                    f"{epoch_ratios[m]['ratio']:.2f}",
                ]
            )
        rows[-1] += [f"{paper[m]['hours']} h", f"{paper[m]['over_ce']:.2f}"]
    table = markdown(
        [
            "method",
            "whole run",
            "/ CE",
            "/ CE, each round",
            "seconds per epoch (fit)",
            "/ CE",
            "paper (V100)",
            "paper / CE",
        ],
        rows,
    )
    run = result["run"]
    table += (
        f"\n\nEach method's whole `train.run`: {run['num_images']:,} synthetic "
        f"{'×'.join(map(str, run['image_shape']))} images, 10 classes, sym 50% "
        f"noise, small_cnn, crop+flip, batch {run['batch_size']}, "
        f"E = {run['epochs']}, per-epoch test evaluation and checkpoint, export "
        f"at the end; medians over {run['rounds']} round(s), the order rotated "
        "each round. Paper: CIFAR-10 sym 50%, PreAct ResNet-18, 200 epochs, one "
        "V100."
    )
    return result, table


# ---------------------------------------------------------------- main
def cpu_model():
    """The CPU's model name, from /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def environment():
    def git(*args):
        try:
            return subprocess.run(
                ["git", *args],
                cwd=os.path.dirname(os.path.abspath(__file__)),
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "commit": git("rev-parse", "HEAD"),
        # Relative to the repository root (the working directory is benchmarks/).
        "galkeras_uncommitted_changes": git(
            "status", "--porcelain", "--", ":/galkeras"
        ),
        "load_average_at_start": os.getloadavg(),
        "tiny": FLAGS.tiny,
    }


def summarise(results):
    """Every target beside its measured value."""
    rows, targets = [], []

    def add(name, measured, key, shown_target=None, note=""):
        limit = TARGETS.get(key)
        met = None if limit is None else bool(measured <= limit)
        shown_target = shown_target or f"≤ {limit:g}"
        targets.append(
            {
                "name": name,
                "measured": measured,
                "target": shown_target,
                "met": met,
                "note": note,
            }
        )
        verdict = {True: "yes", False: "no", None: "–"}[met]
        rows.append([name, f"{measured:.3g}", shown_target, verdict, note])

    for kind, entry in results.get("step", {}).get("backbones", {}).items():
        r = entry["ratios"]
        add(
            f"twins / CE step, {kind}",
            r["twins_over_ce"]["ratio"],
            "twins_over_ce",
            "≤ 2.05 (floor 2.0)",
        )
        add(f"full GAL / CE step, {kind}", r["gal_over_ce"]["ratio"], "gal_over_ce")
        add(
            f"agreement + gating / twins step, {kind}",
            r["agreement_gating_over_twins"]["ratio"],
            "agreement_gating_over_twins",
        )
    if "scaling" in results:
        fit = results["scaling"]["fit"]
        add(
            "agreement cost: slope of log time on log parameters",
            fit.get("agreement_slope_resnets", fit["agreement_slope_all"]),
            "agreement_scaling_slope",
            "≤ 1 (linear)",
        )
    for kind, entry in results.get("refresh", {}).get("backbones", {}).items():
        add(
            f"refresh per network / CE epoch, {kind}",
            entry["ratios"]["refresh_per_network_over_ce_epoch"]["ratio"],
            "refresh_per_network_over_ce_epoch",
            note=(
                "at the matmul peak: "
                f"{entry['arithmetic']['refresh_per_network_over_ce_epoch_at_peak']:.3g}"
            ),
        )
    if "run" in results:
        r = results["run"]["ratios"]
        if "gal_wall_over_floor" in r:
            add(
                "GAL whole run: wall / floor (parts 1-3)",
                r["gal_wall_over_floor"],
                "wall_over_floor",
            )
        add(
            "GAL whole run: wall / same-round floor",
            r["gal_wall_over_floor_same_round"],
            "wall_over_floor",
        )
        add(
            "GAL / CE whole run (CE as galkeras runs it)",
            r["gal_over_ce_gal"],
            None,
            f"paper: {PAPER_GAL_OVER_CE}",
            "information",
        )
        add(
            "GAL / CE whole run (CE in plain Keras)",
            r["gal_over_ce_keras"],
            None,
            f"paper: {PAPER_GAL_OVER_CE}",
            "information",
        )
    for method, entry in results.get("table6", {}).get("methods", {}).items():
        if method != "ce":
            add(
                f"{METHOD_LABELS[method]} / CE whole run (Table 6)",
                entry["wall_over_ce"]["ratio"],
                None,
                f"paper: {entry['paper_over_ce']:.2f}",
                "information",
            )
    table = markdown(["figure", "measured", "target", "met", "note"], rows)
    return targets, table


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=float)


def smoke_test_mode():
    """What --tiny does to TensorFlow: Grappler's rewrites change how fast a
    function runs, not what it computes, and cost more than the tiny steps
    themselves at each first call (the suite runs this mode)."""
    if FLAGS.tiny:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


def main(argv):
    del argv
    smoke_test_mode()
    # Every contender has its own train function: TF's retracing warning is noise.
    tf.get_logger().setLevel("ERROR")
    # Part 6's runs would log each SavedModel export's steps at INFO.
    logging.set_verbosity(logging.WARNING)
    if FLAGS.memory_probe:
        memory_probe(json.loads(FLAGS.memory_probe))
        return
    settings = settings_from_flags()
    env = environment()
    if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
    benches = {}
    if {"step", "refresh", "run"} & set(FLAGS.parts):
        for backbone in settings.step_backbones:
            if backbone.kind == "small_cnn" or {"step", "refresh"} & set(FLAGS.parts):
                benches[backbone.kind] = Bench(
                    backbone, settings.batch_size, settings.images[backbone.kind]
                )
    common = {"settings": dataclasses.asdict(settings), "environment": env}
    parts = {
        "step": ("step_time", "1. Step time", lambda: part_step(settings, benches)),
        "scaling": (
            "agreement_scaling",
            "2. Agreement-and-gating cost against parameter count",
            lambda: part_scaling(settings),
        ),
        "refresh": (
            "refresh",
            "3. Refresh cost",
            lambda: part_refresh(settings, benches),
        ),
        "run": (
            "whole_run",
            "4. Whole-run wall time",
            lambda: part_run(
                settings, benches, results.get("step"), results.get("refresh")
            ),
        ),
        "memory": ("memory", "5. Peak memory", lambda: part_memory(settings)),
        "table6": (
            "training_time",
            "6. Training time of every method (the paper's Table 6)",
            lambda: part_table6(settings),
        ),
    }
    results, tables = {}, []
    for key in PARTS:
        if key not in FLAGS.parts:
            continue
        filename, title, run = parts[key]
        start = time.perf_counter()
        result, table = run()
        result["part_seconds"] = time.perf_counter() - start
        results[key] = result
        tables.append(f"## {title}\n\n{table}\n")
        print(f"({key}: {result['part_seconds']:.0f} s)")
        print(tables[-1], flush=True)
        if FLAGS.out:
            write_json(
                os.path.join(FLAGS.out, f"{filename}.json"), {**common, **result}
            )
    targets, table = summarise(results)
    tables.append(f"## Targets\n\n{table}\n")
    print(tables[-1], flush=True)
    env["load_average_at_end"] = os.getloadavg()
    if FLAGS.out:
        write_json(
            os.path.join(FLAGS.out, "summary.json"),
            {**common, "targets": targets, "parts": sorted(results)},
        )
        with open(os.path.join(FLAGS.out, "tables.md"), "w") as f:
            f.write("\n".join(tables))


if __name__ == "__main__":
    app.run(main)
