"""Label issues: cleanlab's scores on a run's probabilities, `label_issues.csv`,
the cleaned `labels.csv` read back by `folder:`, recomputation from a run, and
the bad inputs."""

import csv
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from conftest import run_module, tiny_run_config, toy_npz

from galkeras import label_issues
from galkeras.datasets import DatasetError, load_dataset

NAMES = ("cat", "dog", "fox")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_scores_are_cleanlabs_and_rows_rank_the_most_suspicious_first():
    from cleanlab.filter import find_label_issues as cleanlab_issues

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=40).astype(np.float32)
    labels = rng.integers(0, 3, size=40)
    labels[:3] = [0, 1, 2]  # every class given
    issues = label_issues.find_label_issues(
        probabilities, labels, heldout_ids=[5], paths=[f"p{i}.png" for i in range(40)]
    )
    # Self-confidence is p(given label); normalised margin (p_y − max_{k≠y} + 1)/2.
    p = probabilities.astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(issues.quality, p[np.arange(40), labels], rtol=1e-6)
    others = np.where(np.eye(3, dtype=bool)[labels], -1.0, p).max(axis=1)
    margin = label_issues.label_quality(p, labels, "normalized_margin")
    np.testing.assert_allclose(margin, (p[np.arange(40), labels] - others + 1) / 2)
    np.testing.assert_array_equal(
        issues.is_issue, cleanlab_issues(labels, p, filter_by="prune_by_noise_rate")
    )
    rows = label_issues.issue_rows(issues, NAMES)
    assert list(rows[0]) == [
        "index",
        "path",
        "given_label",
        "suggested_label",
        "label_quality",
        "is_issue",
        "heldout",
    ]
    order = [r["index"] for r in rows]
    assert sorted(order) == list(range(40))
    assert order == sorted(order, key=lambda i: (issues.quality[i], i))
    first = rows[0]
    i = first["index"]
    assert first["path"] == f"p{i}.png"
    assert first["given_label"] == NAMES[labels[i]]
    assert first["suggested_label"] == NAMES[probabilities[i].argmax()]
    assert [r["heldout"] for r in rows if r["index"] == 5] == [1]
    # Without file paths there is no path column.
    no_paths = dataclasses.replace(issues, paths=None)
    assert "path" not in label_issues.issue_rows(no_paths, NAMES)[0]


def _folder(root, per_class=4):
    for c, name in enumerate(NAMES):
        for i in range(per_class):
            path = root / "train" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = np.full((6, 6, 3), 10 * c + i, np.uint8)
            path.write_bytes(tf.io.encode_png(image).numpy())
            test = root / "test" / name / f"{i}.png"
            test.parent.mkdir(parents=True, exist_ok=True)
            test.write_bytes(path.read_bytes())
    return root


def test_cleaned_labels_read_back_through_folder_labels_csv(tmp_path):
    root = _folder(tmp_path / "pets")
    data = load_dataset(f"folder:{root}")
    assert data.train_paths[0] == "train/cat/0.png"
    n = len(data.y_train)
    # Two issues: train/cat/1.png (given cat, suggested dog) and train/fox/3.png.
    suggested = data.y_train.copy()
    is_issue = np.zeros(n, bool)
    wrong = ("train/cat/1.png", "train/fox/3.png")
    flagged = [data.train_paths.index(p) for p in wrong]
    is_issue[flagged] = True
    suggested[flagged] = [1, 0]
    issues = label_issues.LabelIssues(
        given=data.y_train,
        suggested=suggested,
        quality=np.linspace(0, 1, n),
        is_issue=is_issue,
        heldout=np.zeros(n, bool),
        paths=data.train_paths,
    )
    relabelled = label_issues.write_clean_labels_csv(
        str(tmp_path / "relabel.csv"), issues, "relabel", NAMES
    )
    again = load_dataset(f"folder:{root}", labels_csv=relabelled)
    expected = data.y_train.copy()
    expected[flagged] = [1, 0]
    np.testing.assert_array_equal(again.y_train, expected)

    dropped = label_issues.write_clean_labels_csv(
        str(tmp_path / "drop.csv"), issues, "drop", NAMES
    )
    cleaned = load_dataset(f"folder:{root}", labels_csv=dropped)
    kept = [p for p in data.train_paths if p not in wrong]
    assert list(cleaned.train_paths) == kept
    np.testing.assert_array_equal(cleaned.y_train, np.delete(data.y_train, flagged))
    np.testing.assert_array_equal(cleaned.x_train, np.delete(data.x_train, flagged, 0))
    # A second round keeps the first round's drops, and an existing file stays.
    assert label_issues.dropped_paths(dropped) == list(wrong)
    with pytest.raises(FileExistsError, match="--overwrite"):
        label_issues.write_clean_labels_csv(dropped, issues, "drop", NAMES)
    # Dropping a whole class is refused by name.
    everything_fox = tmp_path / "nofox.csv"
    everything_fox.write_text(
        "".join(f"train/fox/{i}.png,\n" for i in range(4)), encoding="utf-8"
    )
    with pytest.raises(
        DatasetError, match=r"no training image in class\(es\) \['fox'\]"
    ):
        load_dataset(f"folder:{root}", labels_csv=str(everything_fox))


def test_flipped_labels_of_a_separable_toy_rank_on_top(tmp_path):
    from sklearn.metrics import roc_auc_score

    from galkeras import train

    path = tmp_path / "toy.npz"
    images, labels, test_images, test_labels = toy_npz(path, n=300, n_test=60)
    config = tiny_run_config(
        tmp_path,
        f"npz:{path}",
        method="ce",
        warmup_epochs=12,
        epochs=4,
        batch_size=30,
        noise_rate=0.2,
        lr=0.05,
        noisy_validation_split=0.1,
    )
    summary = train.run(config)
    run_dir = tmp_path / "run"
    assert summary["label_issues"]["probabilities"] == "net"
    rows = _rows(run_dir / "label_issues.csv")
    with np.load(run_dir / "labels.npz") as record:
        flipped = record["noisy_labels"] != record["clean_labels"]
    assert len(rows) == 300 and 40 < flipped.sum() < 80
    quality = np.zeros(300)
    for row in rows:
        quality[int(row["index"])] = float(row["label_quality"])
    assert roc_auc_score(flipped, -quality) >= 0.9
    assert sum(int(r["heldout"]) for r in rows) == 30

    # Recomputed from the checkpoint with the same options: the same file.
    out = tmp_path / "again.csv"
    label_issues.from_run(str(run_dir), out=str(out))
    assert out.read_bytes() == (run_dir / "label_issues.csv").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        label_issues.from_run(str(run_dir))
    with pytest.raises(label_issues.RunProblem, match="--method=ce has"):
        label_issues.from_run(str(run_dir), probabilities="joint", out=str(out))
    # Other data than the run recorded: refused by name.
    np.savez(
        path,
        x_train=images,
        y_train=(labels + 1) % 3,
        x_test=test_images,
        y_test=test_labels,
    )
    with pytest.raises(label_issues.RunProblem, match="labels.npz"):
        label_issues.from_run(str(run_dir), out=str(out), overwrite=True)


def test_label_issue_flags_are_refused_before_training(tmp_path):
    from galkeras import train

    def problems(**values):
        return train.label_issue_problems(train.TrainConfig(**values))

    assert train.LABEL_QUALITY_SCORES == label_issues.SCORES
    assert train.LABEL_ISSUE_FILTERS == label_issues.FILTERS
    assert train.CLEAN_LABEL_MODES == label_issues.CLEAN_MODES
    assert problems() == []
    (problem,) = problems(write_clean_labels="drop")
    assert "--dataset=digits is not one" in problem
    assert problems(dataset="folder:/x", write_clean_labels="drop") == []
    (problem,) = problems(method="ce", label_issue_probabilities="joint")
    assert "--method=ce has ('auto', 'net')" in problem
    (problem,) = problems(train_student=False, label_issue_probabilities="student")
    assert "--notrain_student" in problem
    (problem,) = problems(epochs=5, warmup_epochs=5, label_issue_probabilities="joint")
    assert "warm-up lasts every epoch" in problem
    # The peers' joint prediction is trained whatever GAL's warm-up flag says.
    assert problems(method="jocor", epochs=2) == []
    assert "is unknown" in problems(label_quality_score="entropy")[0]
    assert "is unknown" in problems(label_issue_filter="mine")[0]
    # auto: GAL's θC, a peer's joint prediction, CE's one network.
    network = train.label_issue_network
    assert network(train.TrainConfig()) == "student"
    assert network(train.TrainConfig(train_student=False)) == "joint"
    assert network(train.TrainConfig(method="jocor")) == "joint"
    assert network(train.TrainConfig(method="ce")) == "net"
    ce_like = train.TrainConfig(warmup_epochs=30, epochs=30, train_student=False)
    assert network(ce_like) == "twin_a"

    # The CLI: a directory without a finished run exits 2 and names what is missing.
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    result = run_module("galkeras.label_issues", f"--model_dir={tmp_path / 'half'}")
    assert result.returncode == 2
    assert "has no summary.json: the run has not finished" in result.stderr
    assert "has no labels.npz" in result.stderr


def test_the_cleaning_loop_trains_again_on_the_cleaned_labels(tmp_path):
    from galkeras import train

    root = _folder(tmp_path / "pets", per_class=8)
    first = train.run(
        tiny_run_config(
            tmp_path / "first",
            f"folder:{root}",
            method="ce",
            warmup_epochs=12,
            epochs=1,
            batch_size=8,
            write_clean_labels="drop",
        )
    )
    entry = first["label_issues"]
    assert 0 < entry["issues"] < 24
    rows = _rows(entry["clean_labels_path"])
    assert len(rows) == 24 and sum(r["label"] == "" for r in rows) == entry["issues"]
    assert {r["path"] for r in rows} == {
        f"train/{c}/{i}.png" for c in NAMES for i in range(8)
    }
    second = train.run(
        tiny_run_config(
            tmp_path / "second",
            f"folder:{root}",
            method="ce",
            warmup_epochs=12,
            epochs=1,
            batch_size=8,
            labels_csv=entry["clean_labels_path"],
        )
    )
    assert second["train_examples"] == 24 - entry["issues"]
