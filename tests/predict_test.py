"""Tests for `galkeras.predict`: predictions for image files equal the served
signature's on the same pixels, from the version and with the rows asked for, and
every bad input exits with status 2, naming it, before the model loads."""

import csv
import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from conftest import run_module

from galkeras import backbones, export, image_files, predict

NAMES = ("cat", "dog", "owl")
IMAGE_SIZE = (8, 8)


def _write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(pixels).numpy())
    return str(path)


def _classifier(seed, channels=3, num_classes=len(NAMES)):
    keras.utils.set_random_seed(seed)
    return backbones.small_cnn(
        (*IMAGE_SIZE, channels),
        num_classes,
        mean=[127.5] * channels,
        std=[64.0] * channels,
        width=2,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A model base path with two exports of different weights, versions 9 and 10
    (so the latest is not the last name in sorted order), and a directory 11
    that holds no SavedModel."""
    base = tmp_path_factory.mktemp("saved_models") / "run"
    for seed, version in ((0, "9"), (1, "10")):
        written = export.export_classifier(_classifier(seed), str(base), NAMES)
        os.rename(written, base / version)
    (base / "11").mkdir()
    return base


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of 5 RGB PNGs, of the model's size and others, one in a
    subfolder, beside a text file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, shape in [
        ("a.png", (8, 8, 3)),
        ("b.PNG", (13, 10, 3)),
        ("c.png", (5, 6, 3)),
        ("d.png", (8, 8, 3)),
        ("sub/e.png", (9, 8, 3)),
    ]:
        _write_png(root / name, rng.integers(0, 256, shape, np.uint8))
    (root / "notes.txt").write_text("not an image")
    return str(root)


def _photo_paths(photos):
    names = ["a.png", "b.PNG", "c.png", "d.png", "sub/e.png"]
    return [os.path.join(photos, name) for name in names]


def _training_pixels(path, channels=3):
    """The pixels training feeds for the file at `path`, computed here with
    TensorFlow alone: decoded, resized with antialiasing, rounded."""
    with open(path, "rb") as f:
        image = tf.io.decode_png(f.read(), channels=channels)
    resized = tf.image.resize(image, IMAGE_SIZE, antialias=True)
    return tf.cast(tf.round(resized), tf.uint8).numpy()


def _served(version_dir, images):
    """The export's `serving_default` outputs for `images`, as NumPy."""
    serve = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    return {k: v.numpy() for k, v in serve(image=tf.constant(images)).items()}


@pytest.fixture
def command_line(capsys):
    """Runs the command line in this process: `(exit status, stderr)`."""

    def run(*args):
        flag_values = flags.FlagValues()
        predict.define_flags(flag_values)
        argv = ["galkeras.predict", *map(str, args)]
        try:
            predict.main(predict.parse_command_line(argv, flag_values), flag_values)
            status = 0
        except SystemExit as exit:
            status = exit.code
        return status, capsys.readouterr().err

    return run


def test_predictions_equal_the_served_signature_on_the_same_pixels(models, photos):
    paths, empty = predict.find_images([photos])
    assert paths == _photo_paths(photos) and empty == []

    # Batches of 2 leave a last batch of 1.
    result = predict.predict_files(models, paths, batch_size=2)

    want = _served(models / "10", np.stack([_training_pixels(p) for p in paths]))
    assert result.paths == paths and result.skipped == []
    assert result.model_version == str(models / "10")
    np.testing.assert_array_equal(result.class_ids[:, 0], want["class_id"])
    np.testing.assert_allclose(
        result.probabilities[:, 0], want["probabilities"].max(-1), rtol=0, atol=1e-6
    )
    assert result.class_names == NAMES
    assert [NAMES[i] for i in result.class_ids[:, 0]] == [
        name.decode() for name in want["class_name"]
    ]


def test_the_highest_version_is_used_unless_one_is_named(models, photos):
    paths = _photo_paths(photos)
    pixels = np.stack([_training_pixels(p) for p in paths])

    latest = predict.predict_files(models, paths, top_k=3)
    named = predict.predict_files(models / "9", paths, top_k=3)

    for result, version in [(latest, "10"), (named, "9")]:
        assert result.model_version == str(models / version)
        want = _served(models / version, pixels)["probabilities"]
        np.testing.assert_allclose(
            result.probabilities,
            np.take_along_axis(want, result.class_ids, axis=-1),
            rtol=0,
            atol=1e-6,
        )
    assert np.abs(latest.probabilities - named.probabilities).max() > 1e-3


def test_top_k_rows_rank_the_classes(models, photos, tmp_path):
    paths = _photo_paths(photos)
    result = predict.predict_files(models, paths, top_k=2)
    out = tmp_path / "predictions.csv"
    predict.write_csv(result, out)

    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class_name", "class_id", "probability", "rank"]
    assert len(rows) == 1 + 2 * len(paths)
    for i, path in enumerate(paths):
        for rank in (1, 2):
            row = rows[1 + 2 * i + rank - 1]
            class_id = result.class_ids[i, rank - 1]
            assert row[:3] == [path, NAMES[class_id], str(class_id)]
            assert row[4] == str(rank)
            # The text reads back as the very float32.
            assert np.float32(row[3]) == result.probabilities[i, rank - 1]
    assert np.all(result.probabilities[:, 0] >= result.probabilities[:, 1])
    assert np.all(result.class_ids[:, 0] != result.class_ids[:, 1])
    with pytest.raises(predict.PredictError, match="top_k=4 exceeds the model's 3"):
        predict.predict_files(models, paths, top_k=4)


def test_greyscale_and_rgba_files_are_converted_as_training_converts_them(
    models, tmp_path
):
    grey = np.random.default_rng(1).integers(0, 256, (8, 8, 1), np.uint8)
    rgb = np.repeat(grey, 3, axis=-1)
    alpha = np.full((8, 8, 1), 128, np.uint8)
    paths = [
        _write_png(tmp_path / "grey.png", grey),
        _write_png(tmp_path / "rgb.png", rgb),
        _write_png(tmp_path / "rgba.png", np.concatenate([rgb, alpha], -1)),
    ]

    result = predict.predict_files(models, paths, top_k=3)

    # Training's own decoding gives the repeated grey for both.
    training = image_files.ImageFiles(paths, IMAGE_SIZE)
    np.testing.assert_array_equal(training[np.arange(3)], np.stack([rgb] * 3))
    want = _served(models / "10", rgb[None])["probabilities"][0]
    for i in range(3):
        np.testing.assert_array_equal(result.class_ids[i], np.argsort(-want))
        np.testing.assert_allclose(
            result.probabilities[i], np.sort(want)[::-1], rtol=0, atol=1e-6
        )


def test_a_greyscale_model_gets_greyscale_pixels_and_refuses_a_gif(tmp_path):
    image = pytest.importorskip("PIL.Image")
    base = tmp_path / "grey_model"
    export.export_classifier(_classifier(2, channels=1, num_classes=2), str(base))
    rgb = np.random.default_rng(2).integers(0, 256, (10, 10, 3), np.uint8)
    png = _write_png(tmp_path / "rgb.png", rgb)

    result = predict.predict_files(base, [png], top_k=2)

    want = _served(base / "1", _training_pixels(png, channels=1)[None])
    np.testing.assert_array_equal(
        result.class_ids[0], np.argsort(-want["probabilities"][0])
    )
    # An export without class names leaves the column empty.
    assert result.class_names is None
    assert {row[1] for row in result.rows()} == {""}

    # TensorFlow decodes a GIF to RGB only, so training could not take it either.
    gif = tmp_path / "rgb.gif"
    buffer = io.BytesIO()
    image.fromarray(rgb).save(buffer, "GIF")
    gif.write_bytes(buffer.getvalue())
    with pytest.raises(predict.PredictError) as refused:
        predict.predict_files(base, [png, str(gif)])
    assert str(refused.value).startswith(
        f"{gif}: its 3-channel image cannot be converted to the 1 channel(s) the "
        "model takes"
    )


def test_a_corrupt_file_stops_the_run_naming_it_or_is_skipped(
    models, photos, tmp_path, command_line
):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [*_photo_paths(photos), str(bad), str(empty)]
    out = tmp_path / "predictions.csv"

    status, stderr = command_line(f"--model={models}", *paths, f"--out={out}")

    assert status == 2
    assert stderr.startswith(f"galkeras.predict: error: {bad}: cannot decode it")
    assert "--skip_corrupt_images" in stderr and not out.exists()
    result = predict.predict_files(models, paths, skip_corrupt_images=True)
    assert result.paths == _photo_paths(photos)
    assert result.skipped == [
        (str(bad), result.skipped[0][1]),
        (str(empty), "the file is empty"),
    ]
    assert "Unknown image file format" in result.skipped[0][1]


def test_bad_inputs_exit_2_naming_them_before_the_model_loads(
    models, photos, tmp_path, command_line, monkeypatch
):
    monkeypatch.setattr(predict, "load_classifier", lambda *_: pytest.fail("loaded"))
    out = tmp_path / "predictions.csv"
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    good = (f"--model={models}", photos, f"--out={out}")
    cases = [
        (
            (f"--model={empty_dir}", photos, f"--out={out}"),
            f"{empty_dir} holds no SavedModel version: expected a model base path "
            f"of integer version directories ({empty_dir}/1/saved_model.pb, ...)",
        ),
        (
            (f"--model={tmp_path / 'missing'}", photos, f"--out={out}"),
            f"the model directory {tmp_path / 'missing'} does not exist.",
        ),
        ((*good, tmp_path / "typo.png"), f"{tmp_path / 'typo.png'} does not exist."),
        (
            (f"--model={models}", empty_dir, f"{empty_dir}/*.jpg", f"--out={out}"),
            f"no image files found in {empty_dir} '{empty_dir}/*.jpg'",
        ),
        ((f"--model={models}", f"--out={out}"), "give the images to classify"),
        ((*good, f"--out={tmp_path}"), f"--out={tmp_path} is a folder"),
        ((*good, f"--out={tmp_path}/no/p.csv"), f"the folder {tmp_path}/no does"),
        ((*good, "--top_k=0"), "flag --top_k=0: 0 is not a positive integer"),
        ((photos, f"--out={out}"), "--model must have a value other than None"),
    ]
    for args, message in cases:
        status, stderr = command_line(*args)
        assert status == 2, (args, stderr)
        assert stderr.startswith("galkeras.predict: error: "), (args, stderr)
        assert message in stderr, (args, stderr)

    out.write_text("earlier results\n")
    status, stderr = command_line(*good)
    assert status == 2
    assert f"--out={out} already exists; pass --overwrite" in stderr
    assert out.read_text() == "earlier results\n"


def test_overwrite_replaces_the_csv_whole(models, photos, tmp_path, command_line):
    out = tmp_path / "predictions.csv"
    out.write_text("earlier results\n")

    status, stderr = command_line(
        f"--model={models}", photos, f"--out={out}", "--overwrite", "--verbose=0"
    )

    assert status == 0, stderr
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert [row[0] for row in rows[1:]] == _photo_paths(photos)
    # Only the renamed CSV is left: no temporary file beside it.
    assert os.listdir(tmp_path) == ["predictions.csv"]


def test_the_command_line_in_a_fresh_process(models, photos, tmp_path):
    folder = tmp_path / "photos"
    good = []
    for path in _photo_paths(photos)[:3]:
        good.append(str(folder / os.path.basename(path)))
        os.makedirs(folder, exist_ok=True)
        with open(path, "rb") as f:
            (folder / os.path.basename(path)).write_bytes(f.read())
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "predictions.csv"

    # No shell runs here, so the module expands the pattern itself.
    ran = run_module(
        "galkeras.predict",
        f"--model={models}",
        f"{folder}/*.png",
        f"{folder}/*.PNG",
        f"--out={out}",
        "--top_k=2",
        "--skip_corrupt_images",
    )

    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout == ""
    assert f"with {models / '10'}; wrote {out} (top 2)" in ran.stderr
    assert "skipped 1 file(s)" in ran.stderr and f"  {bad}: cannot decode" in ran.stderr
    want = predict.predict_files(models, sorted(good), top_k=2)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert rows == [[str(cell) for cell in row] for row in want.rows()]
