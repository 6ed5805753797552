"""Class distribution agreement sampling (CDAS, paper §3.1, Figure 3).

`CDASSampler` plans, for every global step, which sample indices θA and θB
train on. A plan is a pure function of `(seed, step)`, so a run resumed at
step `s` sees exactly the batches an uninterrupted run would have seen, and
parallel `tf.data` threads may ask for steps in any order.

`paired_dataset` turns those plans into a `tf.data` pipeline of twin batches;
`inference_dataset` walks the whole training set in order for the per-epoch
pseudo-label refresh (θC, §3.3).
"""

import collections
import threading

import numpy as np
import tensorflow as tf

SAMPLING_MODES = ("cdas", "cdas_no_reverse", "random", "identical")

# Third entropy word of every `np.random.default_rng([seed, n, ID])`, so that
# pass permutations, the second (random-mode) stream and the matched draws
# never share a generator.
_STREAM_IDS = (0x5EED0, 0x5EED1)
_MATCH_ID = 0x3A7C4

# Pass permutations kept per sampler; parallel map threads straddle at most a
# pass boundary, in up to two streams.
_CACHED_PASSES = 6
# CDAS pairs kept per sampler: the map threads run a few steps ahead, in any
# order, and each pair serves two neighbouring steps.
_CACHED_PAIRS = 32


class CDASSampler:
    """Plans the twin batches of Gradient Agreement Learning.

    Free batches walk an endless stream of shuffled passes over the training
    set S: pass `p` is `np.random.default_rng([seed, p, STREAM_ID])
    .permutation(N)` and free batch `k` is entries `k*bs … (k+1)*bs - 1` of
    the concatenated passes, so one batch may straddle two passes. Every batch
    holds exactly `batch_size` indices, which keeps shapes static for XLA and
    `tf.distribute`.

    During warm-up (`step < warmup_steps`) θA trains on free batch `step` and
    θB is given the same indices (it does not train). Afterwards, with
    `t = step - warmup_steps`, the mode decides the pair:

    - `"cdas"`: cycles of four steps over two pairs (F, M) and (F', M'), each
      M matched to its F: (F, M), (M, F), (M', F'), (F', M'). A cycle
      consumes two free batches.
    - `"cdas_no_reverse"`: the same role pattern, but every step draws a new
      pair, so each step consumes one free batch.
    - `"random"`: θA's batch comes from the main stream and θB's from a second,
      independent stream.
    - `"identical"`: θB trains on θA's batch.

    A matched batch M holds, for every class j, as many samples of annotated
    class j as F does, drawn from S − F without replacement. When class j has
    too few samples outside F, the remainder is drawn with replacement from
    class j outside F, or from all of class j when none lies outside F; each
    such class counts once in `fallback_count`.

    Args:
        labels: int array of shape `[N]`, the annotated (possibly noisy)
            labels. The returned indices are positions in it and double as
            sample ids.
        batch_size: int, indices per batch, `1 <= batch_size <= N`.
        num_classes: int or None, number of classes K. Defaults to
            `max(labels) + 1`.
        mode: str, one of `SAMPLING_MODES`.
        seed: int, seeds every draw.
        warmup_steps: int, global steps of the warm-up phase (W epochs times
            `steps_per_epoch`).

    Example:

    >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    >>> sampler = CDASSampler(labels, batch_size=4, warmup_steps=3)
    >>> sampler.steps_per_epoch
    3
    >>> idx_a, idx_b = sampler.plan(3)
    >>> bool(np.all(np.sort(labels[idx_a]) == np.sort(labels[idx_b])))
    True

    Reference:
        Yan, Tian, Jiang, Chen. "Gradient Agreement Hinders the Memorization
        of Noisy Labels". Applied Sciences 13(3), 1823 (2023), §3.1.
    """

    def __init__(
        self,
        labels,
        batch_size,
        *,
        num_classes=None,
        mode="cdas",
        seed=0,
        warmup_steps=0,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(
                f"`labels` must be a non-empty 1-D array, got shape {labels.shape}."
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"`labels` must be integers, got dtype {labels.dtype}.")
        num_examples = labels.size
        if not 1 <= batch_size <= num_examples:
            raise ValueError(
                f"`batch_size` must be in [1, {num_examples}], got {batch_size}."
            )
        if mode not in SAMPLING_MODES:
            raise ValueError(f"`mode` must be one of {SAMPLING_MODES}, got {mode!r}.")
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"`labels` must lie in [0, {num_classes}), got values in "
                f"[{labels.min()}, {labels.max()}]."
            )
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")

        # === Config ===
        self.labels = labels.astype(np.int64)
        self.labels.flags.writeable = False
        self.batch_size = int(batch_size)
        self.num_classes = int(num_classes)
        self.mode = mode
        self.seed = int(seed)
        self.warmup_steps = int(warmup_steps)
        self.num_examples = num_examples
        self.steps_per_epoch = -(-num_examples // self.batch_size)

        # === State ===
        order = np.argsort(self.labels, kind="stable")
        class_sizes = np.bincount(self.labels, minlength=self.num_classes)
        self._members = np.split(order, np.cumsum(class_sizes)[:-1])
        self._passes = collections.OrderedDict()
        self._passes_lock = threading.Lock()
        self._fallback_count = 0
        self._fallback_lock = threading.Lock()
        self._pairs = collections.OrderedDict()
        self._pairs_lock = threading.Lock()

    @property
    def fallback_count(self):
        """Classes-in-batch whose matched draw needed a fallback, so far."""
        with self._fallback_lock:
            return self._fallback_count

    def _pass_permutation(self, stream, pass_number):
        key = (stream, pass_number)
        with self._passes_lock:
            if key in self._passes:
                self._passes.move_to_end(key)
                return self._passes[key]
        # Computed outside the lock: at N = 1M it takes tens of milliseconds.
        rng = np.random.default_rng([self.seed, pass_number, _STREAM_IDS[stream]])
        permutation = rng.permutation(self.num_examples)
        permutation.flags.writeable = False
        with self._passes_lock:
            self._passes[key] = permutation
            while len(self._passes) > _CACHED_PASSES:
                self._passes.popitem(last=False)
        return permutation

    def free_batch(self, k, stream=0):
        """Free batch number `k` of stream `stream` (0: main, 1: random mode's B).

        Returns:
            A new int64 array of `batch_size` indices.
        """
        if k < 0:
            raise ValueError(f"Free batch number must be >= 0, got {k}.")
        if stream not in (0, 1):
            raise ValueError(f"`stream` must be 0 or 1, got {stream}.")
        start = k * self.batch_size
        pass_number, offset = divmod(start, self.num_examples)
        first = self._pass_permutation(stream, pass_number)
        end = offset + self.batch_size
        if end <= self.num_examples:
            return first[offset:end].copy()
        second = self._pass_permutation(stream, pass_number + 1)
        return np.concatenate([first[offset:], second[: end - self.num_examples]])

    def matched_batch(self, free_idx, rng):
        """A batch with `free_idx`'s class counts, drawn from S − free_idx.

        Args:
            free_idx: int array, the free batch F (may hold a duplicate when it
                straddles two passes; counts are taken over the multiset).
            rng: `np.random.Generator` for the draw.

        Returns:
            A shuffled int64 array of `len(free_idx)` indices.
        """
        free_idx = np.asarray(free_idx, dtype=np.int64)
        free_unique = np.unique(free_idx)
        wanted = np.bincount(self.labels[free_idx], minlength=self.num_classes)
        inside = np.bincount(self.labels[free_unique], minlength=self.num_classes)
        parts = [
            self._draw_class(j, int(wanted[j]), int(inside[j]), free_unique, rng)
            for j in np.flatnonzero(wanted)
        ]
        return rng.permutation(np.concatenate(parts)).astype(np.int64, copy=False)

    def _draw_class(self, class_id, count, count_in_free, free_unique, rng):
        members = self._members[class_id]
        if members.size - count_in_free >= count:
            # Oversample by the members of F this class holds, then drop them:
            # O(batch) per class (Floyd's algorithm) instead of O(class size).
            candidates = rng.choice(members, size=count + count_in_free, replace=False)
            outside = ~np.isin(candidates, free_unique, assume_unique=True)
            return candidates[outside][:count]
        with self._fallback_lock:
            self._fallback_count += 1
        # Only small classes get here: members.size < count + count_in_free.
        outside = members[~np.isin(members, free_unique, assume_unique=True)]
        if outside.size == 0:
            return rng.choice(members, size=count, replace=True)
        refill = rng.choice(outside, size=count - outside.size, replace=True)
        return np.concatenate([outside, refill])

    def _free_and_matched(self, free_number):
        """The pair (F, M) of free batch `free_number`, drawn once for the two
        CDAS steps that share it (and counted once in `fallback_count`)."""
        with self._pairs_lock:
            if free_number not in self._pairs:
                free = self.free_batch(free_number)
                rng = np.random.default_rng([self.seed, free_number, _MATCH_ID])
                pair = (free, self.matched_batch(free, rng))
                for indices in pair:
                    indices.flags.writeable = False
                self._pairs[free_number] = pair
                while len(self._pairs) > _CACHED_PAIRS:
                    self._pairs.popitem(last=False)
            self._pairs.move_to_end(free_number)
            return self._pairs[free_number]

    def plan(self, step):
        """Indices θA and θB train on at global step `step`.

        Returns:
            `(idx_a, idx_b)`, two int64 arrays of `batch_size` indices.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"`step` must be >= 0, got {step}.")
        if step < self.warmup_steps:
            idx_a = self.free_batch(step)
            return idx_a, idx_a.copy()
        t = step - self.warmup_steps
        base = self.warmup_steps
        if self.mode == "identical":
            idx_a = self.free_batch(base + t)
            return idx_a, idx_a.copy()
        if self.mode == "random":
            idx_a = self.free_batch(base + t, stream=0)
            return idx_a, self.free_batch(base + t, stream=1)
        if self.mode == "cdas":
            # Two free batches per four-step cycle: steps 1-2 share (F, M),
            # steps 3-4 share (F', M').
            free_number = base + 2 * (t // 4) + (1 if t % 4 >= 2 else 0)
        else:
            free_number = base + t
        free, matched = self._free_and_matched(free_number)
        # Figure 3 roles: (F, M), (M, F), (M', F'), (F', M').
        if t % 4 in (0, 3):
            return free, matched
        return matched, free


def make_pair_loader(sampler, images, labels):
    """The function `paired_dataset` maps over global steps.

    It runs `sampler.plan(step)` and gathers both batches in one
    `tf.numpy_function`: from an in-memory array, the pixels (so the array
    never becomes a graph constant); from `ImageFiles`, the file paths, which
    are then read and decoded in the graph. When θB's indices equal θA's
    (warm-up, `identical`), the batch is gathered and decoded once. It works
    eagerly and inside `tf.data.Dataset.map`.

    Args:
        sampler: `CDASSampler`.
        images: uint8 array `[N, H, W, C]`, or `galkeras.ImageFiles`.
        labels: int array `[N]`, the annotated labels.

    Returns:
        `load(step) -> dict` with `image_a` (uint8 `[bs, H, W, C]`),
        `label_a` (int32 `[bs]`), `id_a` (int64 `[bs]`) and the same for `_b`.
    """
    source = _ImageSource(images)
    labels = np.asarray(labels).astype(np.int32)
    if not len(source) == len(labels) == sampler.num_examples:
        raise ValueError(
            f"`images` ({len(source)}), `labels` ({len(labels)}) and the sampler "
            f"({sampler.num_examples}) must hold the same number of examples."
        )
    batch_size = sampler.batch_size

    def gather(step):
        idx_a, idx_b = sampler.plan(step)
        batch_a = source.gather(idx_a)
        # Warm-up and `identical` give θB θA's indices: gather the batch once.
        batch_b = batch_a if np.array_equal(idx_a, idx_b) else source.gather(idx_b)
        return (batch_a, labels[idx_a], idx_a, batch_b, labels[idx_b], idx_b)

    def load(step):
        outputs = tf.numpy_function(
            gather,
            [step],
            [source.gathered_dtype, tf.int32, tf.int64] * 2,
            stateful=False,
        )
        id_a = tf.ensure_shape(outputs[2], (batch_size,))
        id_b = tf.ensure_shape(outputs[5], (batch_size,))
        image_a = source.to_images(outputs[0], batch_size)
        image_b = tf.cond(
            tf.reduce_all(tf.equal(id_a, id_b)),
            lambda: image_a,
            lambda: source.to_images(outputs[3], batch_size),
        )
        return {
            "image_a": image_a,
            "label_a": tf.ensure_shape(outputs[1], (batch_size,)),
            "id_a": id_a,
            "image_b": image_b,
            "label_b": tf.ensure_shape(outputs[4], (batch_size,)),
            "id_b": id_b,
        }

    return load


class _ImageSource:
    """Random access to training images, in memory or as `ImageFiles`.

    `gather(ids)` runs in NumPy (inside a `tf.numpy_function`) and returns the
    pixels or the paths; `to_images` turns its output into uint8 images in the
    graph, decoding files there so decoding runs in parallel outside the GIL.
    Images stay uint8 up to the train step, which casts them on its device: a
    quarter of float32's bytes cross from the host.
    """

    def __init__(self, images):
        from galkeras.image_files import ImageFiles

        self.files = images if isinstance(images, ImageFiles) else None
        if self.files is not None:
            self.values = self.files.paths.astype(str).astype(bytes)
            self.gathered_dtype = tf.string
        else:
            self.values = np.asarray(images)
            if self.values.ndim != 4:
                raise ValueError(
                    f"`images` must be [N, H, W, C], got shape {self.values.shape}."
                )
            self.gathered_dtype = tf.as_dtype(self.values.dtype)
        self.image_shape = tuple(images.shape[1:])

    def __len__(self):
        return len(self.values)

    def gather(self, ids):
        return self.values[ids]

    def to_images(self, gathered, batch_size):
        if self.files is not None:
            gathered = self.files.decode_paths(tf.ensure_shape(gathered, (batch_size,)))
        return tf.ensure_shape(gathered, (batch_size, *self.image_shape))


def paired_dataset(
    sampler,
    images,
    labels,
    *,
    start_step,
    augment=None,
    num_parallel_calls=tf.data.AUTOTUNE,
    device=None,
):
    """An endless `tf.data.Dataset` of twin batches, one element per step.

    Args:
        sampler: `CDASSampler`, plans the indices of every step.
        images: uint8 array `[N, H, W, C]`, held in memory.
        labels: int array `[N]`, the annotated labels.
        start_step: int, or a zero-argument callable returning one. The
            callable is called each time an iterator is created, so a training
            loop can choose where the stream resumes.
        augment: optional function on an image batch, applied to `image_a`
            and `image_b` separately: on the uint8 batch when it has
            `takes_uint8 = True` (`galkeras.augment.Augment`), else on the
            batch as float32 in the 0-255 scale. A `galkeras.augment.Augment`
            (or any callable with `takes_seed = True`) is called as
            `augment(images, seed)` with a stateless seed made of the
            sampler's seed, the step and the twin, so augmentation is
            reproducible; any other callable as `augment(images)`.
        num_parallel_calls: parallelism of the load and augment maps.
        device: None, or the device (`input_device`) the batches are prefetched
            to, so that a step's copy from the host overlaps the step before.

    Returns:
        A dataset of dicts `{"image_a", "label_a", "id_a", "image_b",
        "label_b", "id_b"}`, see `make_pair_loader`. Images are uint8 (float32
        on the 0–255 scale after an augmentation that interpolates); the train
        step casts them on its device and the model normalises them. Every
        component is batched, so `tf.distribute` can split it across replicas.
        With `device`, batches are prefetched to that device.
    """
    if not callable(start_step) and start_step < 0:
        raise ValueError(f"`start_step` must be >= 0, got {start_step}.")

    def first_step():
        step = int(start_step() if callable(start_step) else start_step)
        if step < 0:
            raise ValueError(f"`start_step` must be >= 0, got {step}.")
        return np.int64(step)

    def steps_from(_):
        # The numpy_function runs when the flat_map opens its inner dataset,
        # i.e. once per new iterator.
        start = tf.numpy_function(first_step, [], tf.int64, stateful=True)
        return tf.data.Dataset.range(tf.reshape(start, []), 2**62)

    load = make_pair_loader(sampler, images, labels)
    seeded = getattr(augment, "takes_seed", False)

    def augment_images(images, step, twin):
        if not getattr(augment, "takes_uint8", False):
            images = tf.cast(images, tf.float32)  # what other callables expect
        if not seeded:
            return augment(images)
        # A stateless seed per (run, step, twin): reproducible in any thread.
        return augment(images, tf.stack([sampler.seed, step * 2 + twin]))

    def load_and_augment(step):
        element = load(step)
        if augment is None:
            return element
        image_a = augment_images(element["image_a"], step, 0)
        # When θB's batch is θA's (warm-up, where θB does not train, and
        # `identical`), it gets θA's augmented images instead of a second pass.
        same = tf.reduce_all(tf.equal(element["id_a"], element["id_b"]))
        image_b = tf.cond(
            same, lambda: image_a, lambda: augment_images(element["image_b"], step, 1)
        )
        return {**element, "image_a": image_a, "image_b": image_b}

    dataset = tf.data.Dataset.from_tensors(np.int64(0)).flat_map(steps_from)
    dataset = dataset.map(
        load_and_augment, num_parallel_calls=num_parallel_calls, deterministic=True
    )
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    dataset = dataset.with_options(_data_sharded_options())
    if device is not None:
        # Must be the last transformation.
        dataset = dataset.apply(tf.data.experimental.prefetch_to_device(device, 2))
    return dataset


def input_device(strategy):
    """Where a training stream is prefetched: the first GPU when no
    `tf.distribute` strategy places the batches (a strategy's distributed
    dataset fetches to its replicas' devices itself), else None (the host).

    Args:
        strategy: the model's `tf.distribute.Strategy`, or None for none.
    """
    if strategy is not None:
        return None
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else None


def inference_dataset(images, batch_size, pad_last=False):
    """All N images in order, un-augmented, for the pseudo-label refresh.

    Args:
        images: uint8 array `[N, H, W, C]` in memory, or `galkeras.ImageFiles`.
        batch_size: int, images per batch; the last, partial batch is kept.
        pad_last: whether the last batch is padded to `batch_size` rows (copies
            of the first image, with id -1), so that every batch has one static
            shape; `batch_size` is then at most N, so padding never outnumbers
            the images.

    Returns:
        A dataset of dicts `{"image": uint8 [b, H, W, C], "id": int64 [b]}`.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    source = _ImageSource(images)
    if pad_last:
        batch_size = max(1, min(batch_size, len(source)))

    def load(ids):
        if pad_last:
            ids = tf.pad(ids, [[0, batch_size - tf.size(ids)]], constant_values=-1)
            ids = tf.ensure_shape(ids, (batch_size,))
        gathered = tf.numpy_function(
            source.gather, [tf.maximum(ids, 0)], source.gathered_dtype, stateful=False
        )
        rows = batch_size if pad_last else None
        return {"image": source.to_images(gathered, rows), "id": ids}

    dataset = tf.data.Dataset.range(len(source)).batch(batch_size)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    return dataset.with_options(_data_sharded_options())


def evaluation_dataset(images, labels, batch_size):
    """`(image, label, weight)` batches in order, un-augmented, for
    `validation_data` and `evaluate`.

    Every batch holds `batch_size` rows: the last is padded (copies of the
    first image) with weight 0, so a compiled test step sees one shape and its
    metrics, weighted, count each real image once.

    Args:
        images: uint8 array `[M, H, W, C]` in memory, or `galkeras.ImageFiles`.
        labels: int array `[M]`.
        batch_size: int, images per batch.

    Returns:
        A dataset of `(uint8 [b, H, W, C], int64 [b], float32 [b])` tuples.
    """
    labels = np.asarray(labels, np.int64)
    if len(labels) != len(images):
        raise ValueError(
            f"{len(images)} images but {len(labels)} labels; they must match."
        )

    def with_weights(batch):
        real = batch["id"] >= 0
        label = tf.gather(labels, tf.maximum(batch["id"], 0))
        return batch["image"], label, tf.cast(real, tf.float32)

    return inference_dataset(images, batch_size, pad_last=True).map(with_weights)


def _data_sharded_options():
    options = tf.data.Options()
    # tf.data's autotuning thread sleeps between optimisation rounds, and an
    # iterator's destructor waits for it to wake: measured up to 17 s at the end
    # of `fit` and up to 0.9 s after every refresh pass (2 CPU cores, TF 2.21).
    # AUTOTUNE arguments then take tf.data's static defaults (map parallelism
    # from the thread-pool size), which measured the same training throughput.
    options.autotune.enabled = False
    # Elements are generated, not read from files: shard by element.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return options
