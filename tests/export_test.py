"""Tests for `galkeras.export`: the served signature, as TF Serving calls it, and
loading `.keras` files."""

import json
import zipfile

import numpy as np
import pytest
from conftest import run_python

from galkeras import backbones, export

# Loads the export in a fresh process, as TF Serving would, calls
# `serving_default` on each case and writes what came back as JSON. Refusals are
# caught and recorded; any other error, or an abort, ends the process.
SERVE_CASES = """
import json, sys
import numpy as np
import tensorflow as tf

serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
images = np.load(sys.argv[2])
cases = {
    "batch": images,
    "empty batch": np.zeros((0, 8, 8, 1), np.uint8),
    "no batch axis": images[0],
    "9x9 images": np.zeros((2, 9, 9, 1), np.uint8),
    "3 channels": np.zeros((2, 8, 8, 3), np.uint8),
    "batch after refusals": images,
}
results = {}
for name, image in cases.items():
    try:
        outputs = serve(image=tf.constant(image))
    except tf.errors.InvalidArgumentError as error:
        results[name] = {"refused": error.message}
        continue
    results[name] = {
        key: {
            "shape": value.shape.as_list(),
            "dtype": value.dtype.name,
            "value": value.numpy().astype(str if value.dtype == tf.string else None)
            .tolist(),
        }
        for key, value in outputs.items()
    }
with open(sys.argv[3], "w") as f:
    json.dump(results, f)
"""


def _softmax(logits):
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def test_served_signature_checks_its_input_in_a_fresh_process(tmp_path):
    # Global average pooling (unlike a Flatten head) accepts any image size, and
    # its BatchNorm layers are what an empty batch trips over under oneDNN.
    model = backbones.small_cnn((8, 8, 1), 3, mean=[0.0], std=[1.0], width=2)
    names = ["zero", "one", "two"]
    version = export.export_classifier(model, str(tmp_path / "served"), names)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), np.uint8)
    np.save(tmp_path / "images.npy", images)

    served = run_python(
        "-c", SERVE_CASES, version, str(tmp_path / "images.npy"), str(tmp_path / "out")
    )

    assert served.returncode == 0, served.stderr[-3000:]
    results = json.loads((tmp_path / "out").read_text())
    want = _softmax(model.predict(images, verbose=0).astype(np.float64))
    for name in ("batch", "batch after refusals"):
        got = results[name]
        np.testing.assert_allclose(got["probabilities"]["value"], want, atol=1e-5)
        assert got["probabilities"]["dtype"] == "float32"
        assert got["class_id"] == {
            "shape": [5],
            "dtype": "int64",
            "value": want.argmax(-1).tolist(),
        }
        assert got["class_name"]["value"] == [names[i] for i in want.argmax(-1)]
    assert results["empty batch"] == {
        "probabilities": {"shape": [0, 3], "dtype": "float32", "value": []},
        "class_id": {"shape": [0], "dtype": "int64", "value": []},
        "class_name": {"shape": [0], "dtype": "string", "value": []},
    }
    for name, received in [
        ("no batch axis", "[8, 8, 1]"),
        ("9x9 images", "[2, 9, 9, 1]"),
        ("3 channels", "[2, 8, 8, 3]"),
    ]:
        message = results[name].get("refused", f"not refused: {results[name]}")
        assert "[N, 8, 8, 1]" in message, (name, message)
        assert f"received shape {received}" in message, (name, message)


def test_the_temperature_divides_the_served_logits_and_leaves_class_id(tmp_path):
    import tensorflow as tf

    model = backbones.small_cnn((8, 8, 1), 3, mean=[0.0], std=[1.0], width=2)
    images = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 1), np.uint8)
    logits = model.predict(images, verbose=0).astype(np.float64)
    served = {}
    for t in (1.0, 0.25):
        version = export.export_classifier(model, str(tmp_path), temperature=t)
        loaded = tf.saved_model.load(version)
        served[t] = loaded.signatures["serving_default"](image=tf.constant(images))
        np.testing.assert_allclose(
            served[t]["probabilities"].numpy(), _softmax(logits / t), atol=1e-5
        )
    np.testing.assert_array_equal(served[0.25]["class_id"], served[1.0]["class_id"])
    np.testing.assert_array_equal(served[1.0]["class_id"], logits.argmax(-1))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be"):
            export.export_classifier(model, str(tmp_path), temperature=bad)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "the file is empty"),
        (np.random.default_rng(0).bytes(512), "not a zip archive"),
    ],
    ids=["zero_bytes", "random_bytes"],
)
def test_load_keras_model_names_a_file_that_is_not_an_archive(
    tmp_path, content, reason
):
    path = tmp_path / "x.keras"
    path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        export.load_keras_model(path)
    message = str(raised.value)
    assert message.startswith(f"{path} is not a Keras archive")
    assert reason in message and "model.save(" in message
    assert "File not found" not in message


def test_load_keras_model_names_a_zip_that_is_not_a_keras_archive(tmp_path):
    path = tmp_path / "x.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    with pytest.raises(ValueError, match="is not a Keras archive.*config.json"):
        export.load_keras_model(path)
