"""Tests for galkeras.sampling: the CDAS planner and its tf.data pipelines."""

import concurrent.futures
import itertools

import numpy as np
import pytest
import tensorflow as tf

from galkeras import sampling
from galkeras.sampling import (
    SAMPLING_MODES,
    CDASSampler,
    inference_dataset,
    make_pair_loader,
    paired_dataset,
)

NUM_CLASSES = 3


def balanced_labels(num_examples=120, num_classes=NUM_CLASSES, seed=0):
    labels = np.arange(num_examples) % num_classes
    return np.random.default_rng(seed).permutation(labels)


def class_counts(labels, idx, num_classes=NUM_CLASSES):
    return np.bincount(labels[idx], minlength=num_classes)


def assert_matched(labels, free, matched):
    np.testing.assert_array_equal(
        class_counts(labels, free), class_counts(labels, matched)
    )


def tiny_images(num_examples, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num_examples, 8, 8, 3), dtype=np.uint8)


# === CDASSampler ===


def test_steps_per_epoch_rounds_up_and_num_classes_defaults_to_max_plus_one():
    sampler = CDASSampler([0, 1, 2, 1, 0, 2, 2], batch_size=3)
    assert sampler.steps_per_epoch == 3
    assert sampler.num_classes == 3


def test_matched_batch_keeps_class_counts_and_avoids_free_batch():
    labels = balanced_labels()
    sampler = CDASSampler(labels, batch_size=12, seed=1)
    rng = np.random.default_rng(0)
    for k in range(20):
        free = sampler.free_batch(k)
        matched = sampler.matched_batch(free, rng)
        assert matched.dtype == np.int64
        assert matched.shape == free.shape
        assert_matched(labels, free, matched)
        assert not np.intersect1d(free, matched).size
        assert np.unique(matched).size == matched.size
    assert sampler.fallback_count == 0


def test_matched_batch_order_does_not_reveal_class():
    labels = balanced_labels()
    sampler = CDASSampler(labels, batch_size=12)
    rng = np.random.default_rng(0)
    orders = {
        tuple(labels[sampler.matched_batch(sampler.free_batch(k), rng)])
        for k in range(10)
    }
    assert all(list(order) != sorted(order) for order in orders)


def test_cdas_cycle_reverses_each_pair_and_alternates_roles():
    labels = balanced_labels()
    sampler = CDASSampler(labels, batch_size=6, seed=3, warmup_steps=2)
    for cycle in range(3):
        first = 2 + 4 * cycle
        plans = [sampler.plan(first + i) for i in range(4)]
        free = sampler.free_batch(2 + 2 * cycle)
        free_next = sampler.free_batch(2 + 2 * cycle + 1)
        # Step 1: (F, M); step 2: (M, F).
        np.testing.assert_array_equal(plans[0][0], free)
        np.testing.assert_array_equal(plans[1][0], plans[0][1])
        np.testing.assert_array_equal(plans[1][1], plans[0][0])
        # Step 3: (M', F'); step 4: (F', M').
        np.testing.assert_array_equal(plans[2][1], free_next)
        np.testing.assert_array_equal(plans[3][0], plans[2][1])
        np.testing.assert_array_equal(plans[3][1], plans[2][0])
        for idx_a, idx_b in plans:
            assert_matched(labels, idx_a, idx_b)
            assert not np.intersect1d(idx_a, idx_b).size
        # Over a cycle both twins see the same multiset of samples.
        seen_a = np.sort(np.concatenate([a for a, _ in plans]))
        seen_b = np.sort(np.concatenate([b for _, b in plans]))
        np.testing.assert_array_equal(seen_a, seen_b)


def test_cdas_no_reverse_draws_a_new_pair_every_step():
    labels = balanced_labels()
    sampler = CDASSampler(labels, batch_size=6, mode="cdas_no_reverse")
    plans = [sampler.plan(t) for t in range(8)]
    for t, (idx_a, idx_b) in enumerate(plans):
        free = sampler.free_batch(t)
        # Roles follow the cdas pattern: (F, M), (M, F), (M, F), (F, M).
        np.testing.assert_array_equal(idx_a if t % 4 in (0, 3) else idx_b, free)
        assert_matched(labels, idx_a, idx_b)
    for (a1, b1), (a2, b2) in itertools.combinations(plans, 2):
        assert not np.array_equal(np.sort(a1), np.sort(a2))
        assert not np.array_equal(np.sort(b1), np.sort(b2))


def test_random_mode_draws_twin_batches_from_independent_streams():
    labels = balanced_labels()
    sampler = CDASSampler(labels, batch_size=12, mode="random", warmup_steps=3)
    for step in range(3, 13):
        idx_a, idx_b = sampler.plan(step)
        np.testing.assert_array_equal(idx_a, sampler.free_batch(step))
        np.testing.assert_array_equal(idx_b, sampler.free_batch(step, stream=1))
        assert not np.array_equal(idx_a, idx_b)
        assert idx_b.dtype == np.int64
        assert idx_b.min() >= 0 and idx_b.max() < labels.size
    # Stream 1 is itself a walk of shuffled passes.
    stream_b = np.concatenate([sampler.free_batch(k, stream=1) for k in range(10)])
    np.testing.assert_array_equal(np.sort(stream_b), np.arange(labels.size))


def test_identical_mode_gives_both_twins_the_same_batch():
    sampler = CDASSampler(balanced_labels(), batch_size=8, mode="identical")
    for step in range(6):
        idx_a, idx_b = sampler.plan(step)
        np.testing.assert_array_equal(idx_a, idx_b)
        np.testing.assert_array_equal(idx_a, sampler.free_batch(step))


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_warmup_walks_shuffled_passes_with_identical_twins(mode):
    num_examples, batch_size = 40, 8
    sampler = CDASSampler(
        balanced_labels(num_examples),
        batch_size=batch_size,
        mode=mode,
        warmup_steps=2 * 5,
    )
    plans = [sampler.plan(step) for step in range(10)]
    for idx_a, idx_b in plans:
        np.testing.assert_array_equal(idx_a, idx_b)
        assert idx_a.shape == (batch_size,) and idx_a.dtype == np.int64
    passes = [np.concatenate([a for a, _ in plans[i : i + 5]]) for i in (0, 5)]
    for one_pass in passes:
        np.testing.assert_array_equal(np.sort(one_pass), np.arange(num_examples))
    assert not np.array_equal(passes[0], passes[1])
    # Phase 2 continues the stream where warm-up left it.
    np.testing.assert_array_equal(sampler.plan(10)[0], sampler.free_batch(10))


def test_free_batches_straddle_passes_at_constant_size():
    num_examples, batch_size = 42, 8
    sampler = CDASSampler(balanced_labels(num_examples), batch_size=batch_size)
    batches = [sampler.free_batch(k) for k in range(21)]
    assert all(batch.shape == (batch_size,) for batch in batches)
    stream = np.concatenate(batches)
    for start in range(0, stream.size, num_examples):
        one_pass = stream[start : start + num_examples]
        np.testing.assert_array_equal(np.sort(one_pass), np.arange(num_examples))


def test_free_batch_returns_a_copy_of_the_cached_pass():
    sampler = CDASSampler(balanced_labels(), batch_size=12)
    batch = sampler.free_batch(0)
    batch[:] = -1
    assert sampler.free_batch(0).min() >= 0


@pytest.mark.parametrize("mode", SAMPLING_MODES)
def test_plans_depend_only_on_seed_and_step(mode):
    labels = balanced_labels()
    steps = list(range(0, 30))
    forward = CDASSampler(labels, 12, mode=mode, seed=5, warmup_steps=4)
    expected = {step: forward.plan(step) for step in steps}

    backward = CDASSampler(labels, 12, mode=mode, seed=5, warmup_steps=4)
    for step in reversed(steps):
        for got, want in zip(backward.plan(step), expected[step]):
            np.testing.assert_array_equal(got, want)

    threaded = CDASSampler(labels, 12, mode=mode, seed=5, warmup_steps=4)
    shuffled = np.random.default_rng(0).permutation(steps).tolist()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(shuffled, pool.map(threaded.plan, shuffled)))
    for step in steps:
        for got, want in zip(results[step], expected[step]):
            np.testing.assert_array_equal(got, want)

    other_seed = CDASSampler(labels, 12, mode=mode, seed=6, warmup_steps=4)
    assert any(
        not np.array_equal(other_seed.plan(step)[1], expected[step][1])
        for step in steps
    )


def tiny_class_labels():
    # Class 0 has one sample, class 1 three, class 2 the other 36.
    return np.array([0, 1, 1, 1] + [2] * 36)


def test_fallback_when_a_class_lies_entirely_inside_the_free_batch():
    labels = tiny_class_labels()
    sampler = CDASSampler(labels, batch_size=8)
    free = np.array([0, 4, 5, 6, 7, 8, 9, 10])
    matched = sampler.matched_batch(free, np.random.default_rng(0))
    assert_matched(labels, free, matched)
    # Nothing of class 0 lies outside F, so its only sample is drawn again.
    assert matched[labels[matched] == 0].tolist() == [0]
    assert sampler.fallback_count == 1


def test_fallback_refills_with_replacement_from_outside_the_free_batch():
    labels = tiny_class_labels()
    sampler = CDASSampler(labels, batch_size=8)
    # A straddling batch: sample 1 appears twice, so class 1 needs three
    # samples but only sample 3 lies outside F.
    free = np.array([1, 2, 1, 4, 5, 6, 7, 8])
    matched = sampler.matched_batch(free, np.random.default_rng(0))
    assert_matched(labels, free, matched)
    assert matched[labels[matched] == 1].tolist() == [3, 3, 3]
    assert not np.intersect1d(free, matched).size
    assert sampler.fallback_count == 1


def test_tiny_classes_never_fail_over_many_steps():
    labels = tiny_class_labels()
    sampler = CDASSampler(labels, batch_size=16, num_classes=4, seed=2)
    for step in range(60):
        idx_a, idx_b = sampler.plan(step)
        assert idx_a.shape == idx_b.shape == (16,)
        np.testing.assert_array_equal(
            class_counts(labels, idx_a, 4), class_counts(labels, idx_b, 4)
        )
    assert sampler.fallback_count > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 13}, "batch_size"),
        ({"batch_size": 4, "mode": "cdas_reverse"}, "identical"),
        ({"batch_size": 4, "num_classes": 2}, r"\[0, 2\)"),
        ({"batch_size": 4, "warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CDASSampler(balanced_labels(12), **kwargs)


def test_negative_labels_raise():
    with pytest.raises(ValueError, match="labels"):
        CDASSampler([0, 1, -1, 2], batch_size=2)


# === tf.data pipelines ===


@pytest.fixture
def pair_data():
    num_examples = 48
    labels = balanced_labels(num_examples)
    images = tiny_images(num_examples)
    sampler = CDASSampler(labels, batch_size=8, seed=4, warmup_steps=2)
    return sampler, images, labels


def assert_element_matches_plan(element, sampler, images, labels, step, offset=0.0):
    for suffix, idx in zip(("a", "b"), sampler.plan(step)):
        np.testing.assert_array_equal(element[f"id_{suffix}"], idx)
        np.testing.assert_array_equal(element[f"label_{suffix}"], labels[idx])
        np.testing.assert_array_equal(
            element[f"image_{suffix}"], images[idx].astype(np.float32) + offset
        )


def test_paired_dataset_element_spec_is_fully_static(pair_data):
    sampler, images, labels = pair_data
    dataset = paired_dataset(sampler, images, labels, start_step=0)
    image_spec = tf.TensorSpec((8, 8, 8, 3), tf.uint8)  # cast in the step
    assert dataset.element_spec == {
        "image_a": image_spec,
        "label_a": tf.TensorSpec((8,), tf.int32),
        "id_a": tf.TensorSpec((8,), tf.int64),
        "image_b": image_spec,
        "label_b": tf.TensorSpec((8,), tf.int32),
        "id_b": tf.TensorSpec((8,), tf.int64),
    }
    policy = dataset.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA


def test_pair_loader_agrees_eagerly_and_inside_tf_data(pair_data):
    sampler, images, labels = pair_data
    load = make_pair_loader(sampler, images, labels)
    dataset = paired_dataset(sampler, images, labels, start_step=1)
    for step, element in zip(range(1, 7), dataset):
        eager = load(tf.constant(step, tf.int64))
        assert_element_matches_plan(eager, sampler, images, labels, step)
        assert_element_matches_plan(element, sampler, images, labels, step)


def test_start_step_callable_is_read_per_iterator(pair_data):
    sampler, images, labels = pair_data
    resume = {"step": 0}
    dataset = paired_dataset(sampler, images, labels, start_step=lambda: resume["step"])
    resume["step"] = 5
    iterator = iter(dataset)
    assert_element_matches_plan(next(iterator), sampler, images, labels, 5)
    assert_element_matches_plan(next(iterator), sampler, images, labels, 6)
    resume["step"] = 11
    assert_element_matches_plan(next(iter(dataset)), sampler, images, labels, 11)
    # The running iterator is unaffected.
    assert_element_matches_plan(next(iterator), sampler, images, labels, 7)


def test_augment_applies_to_both_twins(pair_data):
    sampler, images, labels = pair_data
    dataset = paired_dataset(
        sampler, images, labels, start_step=3, augment=lambda batch: batch + 1.0
    )
    element = next(iter(dataset))
    assert_element_matches_plan(element, sampler, images, labels, 3, offset=1.0)


def test_paired_dataset_rejects_mismatched_arrays(pair_data):
    sampler, images, labels = pair_data
    with pytest.raises(ValueError, match="same number"):
        paired_dataset(sampler, images[:-1], labels, start_step=0)
    with pytest.raises(ValueError, match="start_step"):
        paired_dataset(sampler, images, labels, start_step=-1)


def test_inference_dataset_walks_all_images_in_order():
    images = tiny_images(42)
    batches = list(inference_dataset(images, batch_size=8))
    assert [len(batch["id"]) for batch in batches] == [8, 8, 8, 8, 8, 2]
    ids = np.concatenate([batch["id"] for batch in batches])
    np.testing.assert_array_equal(ids, np.arange(42))
    pixels = np.concatenate([batch["image"] for batch in batches])
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, images)


def test_padded_inference_dataset_has_one_shape_and_marks_its_padding():
    images = tiny_images(42)
    batches = list(inference_dataset(images, batch_size=8, pad_last=True))
    assert {batch["image"].shape[0] for batch in batches} == {8}
    ids = np.concatenate([batch["id"] for batch in batches])
    np.testing.assert_array_equal(ids, list(range(42)) + [-1] * 6)
    np.testing.assert_array_equal(batches[-1]["image"][:2], images[40:])


def test_each_cdas_pair_is_drawn_once_for_its_two_steps(monkeypatch):
    labels = balanced_labels(48)
    sampler = CDASSampler(labels, batch_size=8, seed=4, warmup_steps=2)
    fresh = CDASSampler(labels, batch_size=8, seed=4, warmup_steps=2)
    draws = []
    real = CDASSampler.matched_batch

    def counted(self, free_idx, rng):
        draws.append(self)
        return real(self, free_idx, rng)

    monkeypatch.setattr(CDASSampler, "matched_batch", counted)
    steps = list(range(2, 10))  # two four-step cycles after the warm-up
    plans = [sampler.plan(step) for step in steps]
    assert draws.count(sampler) == 4  # (F, M), (F', M') per cycle
    # The same plans as a sampler asked in another order (no cache shared).
    for step, plan in zip(reversed(steps), reversed(plans)):
        for got, expected in zip(fresh.plan(step), plan):
            np.testing.assert_array_equal(got, expected)


def test_prefetch_to_a_device_keeps_the_stream(pair_data):
    sampler, images, labels = pair_data
    # No GPU here: the host itself stands for the device.
    assert sampling.input_device(None) is None
    assert sampling.input_device(tf.distribute.get_strategy()) is None
    dataset = paired_dataset(sampler, images, labels, start_step=3, device="/cpu:0")
    for step, element in zip(range(3, 6), dataset):
        assert_element_matches_plan(element, sampler, images, labels, step)


def test_module_exports_modes():
    assert sampling.SAMPLING_MODES == (
        "cdas",
        "cdas_no_reverse",
        "random",
        "identical",
    )


def test_random_augment_is_drawn_once_when_theta_b_shares_theta_a_batch(pair_data):
    sampler, images, labels = pair_data  # warm-up: steps 0 and 1

    def noisy(batch):
        return batch + tf.random.uniform(tf.shape(batch), maxval=0.5)

    dataset = paired_dataset(sampler, images, labels, start_step=0, augment=noisy)
    elements = [next(it) for it in [iter(dataset)] for _ in range(4)]
    for step, element in enumerate(elements):
        same = np.array_equal(element["image_a"], element["image_b"])
        # Warm-up reuses θA's augmented batch; CDAS steps augment θB's own batch.
        assert same == (step < sampler.warmup_steps)
        assert_element_matches_plan(
            {
                **element,
                "image_a": np.floor(element["image_a"]),
                "image_b": np.floor(element["image_b"]),
            },
            sampler,
            images,
            labels,
            step,
        )
