"""Flag files and `galkeras.reproduce`: every file parses and is documented,
the method files of Tables 1-3 add only their own flags to a shared base,
representative files dry-run, and an experiment of two tiny runs yields its
table."""

import dataclasses
import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest

from galkeras import reproduce, train
from galkeras.report import PAPER_TABLE1, Setting, load_run, table_markdown

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS_DIR = os.path.join(REPO, "flags")
ALL_FLAG_FILES = glob.glob(os.path.join(FLAGS_DIR, "**", "*.flags"), recursive=True)
# A base file holds a protocol that method files include; it is never run.
BASE_FILES = sorted(p for p in ALL_FLAG_FILES if f"{os.sep}base{os.sep}" in p)
FLAG_FILES = sorted(set(ALL_FLAG_FILES) - set(BASE_FILES))
TABLE1_METHODS = {
    "": "gal",
    "_ce": "ce",
    "_coteaching": "coteaching",
    "_coteaching_plus": "coteaching_plus",
    "_jocor": "jocor",
}
TABLE1_SETTINGS = {
    "cifar10_sym20": Setting("cifar10", "sym", 0.2),
    "cifar10_sym50": Setting("cifar10", "sym", 0.5),
    "cifar10_sym80": Setting("cifar10", "sym", 0.8),
    "cifar10_asym40": Setting("cifar10", "asym", 0.4),
    "cifar100_sym20": Setting("cifar100", "sym", 0.2),
    "cifar100_sym50": Setting("cifar100", "sym", 0.5),
    "cifar100_sym80": Setting("cifar100", "sym", 0.8),
}


@pytest.fixture
def at_repo_root(monkeypatch):
    """Flag files include others by paths relative to the repository root,
    where the README runs every command."""
    monkeypatch.chdir(REPO)


def _config(name, **overrides):
    return train.config_from_flagfile(os.path.join(FLAGS_DIR, name), **overrides)


def _header(path):
    with open(path) as f:
        return "".join(line for line in f if line.startswith("#"))


@pytest.mark.parametrize(
    "path", FLAG_FILES, ids=[os.path.relpath(p, FLAGS_DIR) for p in FLAG_FILES]
)
def test_every_flag_file_parses_and_says_how_long_and_what_to_expect(
    path, at_repo_root
):
    config = train.config_from_flagfile(path)
    assert train.config_problems(config) == []
    with open(path) as f:
        header = [line for line in f if line.startswith("#")]
    text = "".join(header)
    assert f"--flagfile={os.path.relpath(path, REPO)}" in text
    assert "runtime" in text and ("Paper" in text or "Not a paper" in text)


@pytest.mark.parametrize(
    "path", BASE_FILES, ids=[os.path.relpath(p, FLAGS_DIR) for p in BASE_FILES]
)
def test_every_base_file_says_it_is_included_and_sets_no_methods_flag(path):
    header = _header(path)
    assert f"--flagfile={os.path.relpath(path, REPO)}" in header
    assert "Not run by itself" in header
    config = train.config_from_flagfile(path)
    method_flags = {f for flags in train.METHOD_FLAGS.values() for f in flags}
    default = train.TrainConfig()
    assert config.method == "gal"  # the default: the base names no method
    assert {
        f for f in method_flags if getattr(config, f) != getattr(default, f)
    } == set()


def test_every_experiment_resolves_and_every_paper_file_belongs_to_one():
    used = set()
    for experiment in reproduce.EXPERIMENTS:
        used.update(reproduce.experiment_files(experiment, FLAGS_DIR))
    paper_files = {p for p in FLAG_FILES if not p.endswith("quickstart.flags")}
    assert paper_files == used
    assert not used & set(BASE_FILES)


def test_table_1_runs_every_method_on_its_settings_base(at_repo_root):
    files = reproduce.experiment_files("table1", FLAGS_DIR)
    expected = {
        os.path.join(FLAGS_DIR, "table1", f"{setting}{suffix}.flags")
        for setting in TABLE1_SETTINGS
        for suffix in TABLE1_METHODS
    }
    assert set(files) == expected and len(files) == 35
    for setting, (dataset, noise_type, rate) in TABLE1_SETTINGS.items():
        base_name = f"table1/base/{setting}.flags"
        base = _config(base_name)
        assert (base.dataset, base.noise_type, base.noise_rate) == (
            dataset,
            noise_type,
            rate,
        )
        for suffix, method in TABLE1_METHODS.items():
            path = os.path.join(FLAGS_DIR, "table1", f"{setting}{suffix}.flags")
            config = train.config_from_flagfile(path)
            assert config.method == method, path
            with open(path) as f:
                assert f"--flagfile=flags/{base_name}\n" in f.read(), path
            # Only the method's own flags differ from the shared base.
            changed = {
                field.name
                for field in dataclasses.fields(config)
                if getattr(config, field.name) != getattr(base, field.name)
            }
            assert changed <= {"method", *train.METHOD_FLAGS[method]}, path
            # Everything of the method's own is allowed: no refused flag.
            assert train.method_flag_problems(config) == [], path
            # The forget rate is the default: the noise rate, r/2 for asym.
            assert config.forget_rate is None
            if method != "gal" and method != "ce":
                expected_rate = rate / 2 if noise_type == "asym" else rate
                assert train.method_forget_rate(config) == expected_rate
            label = {
                "gal": "GAL",
                "ce": "Cross Entropy",
                "coteaching": "Co-teaching",
                "coteaching_plus": "Co-teaching+",
                "jocor": "JoCoR",
            }[method]
            best, last, _ = PAPER_TABLE1[(label, Setting(dataset, noise_type, rate))]
            assert f"Paper (Table 1, {label}, best / last): {best} / {last}." in (
                _header(path)
            ), path
        plus = _config(f"table1/{setting}_coteaching_plus.flags")
        jocor = _config(f"table1/{setting}_jocor.flags")
        # Co-teaching+'s official init_epoch, JoCoR's recommended λ.
        assert plus.init_epoch == (20 if dataset == "cifar10" else 5)
        assert jocor.co_lambda == (
            0.85 if dataset == "cifar100" else 0.65 if rate == 0.8 else 0.9
        )


# Tables 2 and 3 (real noise): setting, method files as in Table 1 (a subset
# for Table 3), the forget rate each peer file gives (our estimate of the noise
# rate: real noise has no known one), and the paper's line of each header.
REAL_NOISE_TABLES = {
    "table2": (
        "animal10n",
        {
            "": "gal",
            "_ce": "ce",
            "_coteaching": "coteaching",
            "_coteaching_plus": "coteaching_plus",
            "_jocor": "jocor",
        },
        0.08,
        {
            "": "Paper (Table 2, GAL, best / last): 83.33 / 82.91.",
            "_ce": "Paper (Table 2, cross entropy, best / last): 82.68 / 81.1.",
            "_coteaching": "Paper (Table 2, Co-Teaching, best / last): 82.43 / 81.52.",
            "_coteaching_plus": (
                "Paper (Table 2, Co-Teaching+, best / last): 50.66 / 48.52."
            ),
            "_jocor": "Paper (Table 2, JoCoR, best / last): 82.88 / 81.06.",
        },
    ),
    "table3": (
        "clothing1m",
        {"": "gal", "_ce": "ce", "_jocor": "jocor"},
        0.385,
        {
            "": "Paper (Table 3, GAL, test accuracy): 73.62.",
            "_ce": "Paper (Table 3): no Cross Entropy row;",
            "_jocor": "Paper (Table 3, JoCoR, test accuracy): 70.30.",
        },
    ),
}


@pytest.mark.parametrize("table", sorted(REAL_NOISE_TABLES))
def test_tables_2_and_3_run_every_method_on_their_base(table, at_repo_root):
    setting, methods, forget_rate, paper_lines = REAL_NOISE_TABLES[table]
    files = reproduce.experiment_files(table, FLAGS_DIR)
    assert files == sorted(
        os.path.join(FLAGS_DIR, table, f"{setting}{suffix}.flags") for suffix in methods
    )
    base_name = f"{table}/base/{setting}.flags"
    base = _config(base_name)
    assert (base.dataset, base.noise_type) == (setting, "none")
    for suffix, method in methods.items():
        path = os.path.join(FLAGS_DIR, table, f"{setting}{suffix}.flags")
        config = train.config_from_flagfile(path)
        assert config.method == method, path
        with open(path) as f:
            assert f"--flagfile=flags/{base_name}\n" in f.read(), path
        changed = {
            field.name
            for field in dataclasses.fields(config)
            if getattr(config, field.name) != getattr(base, field.name)
        }
        assert changed <= {"method", *train.METHOD_FLAGS[method]}, path
        assert train.method_flag_problems(config) == [], path
        if "forget_rate" in train.METHOD_FLAGS[method]:
            assert config.forget_rate == forget_rate, path
            assert "our estimate" in _header(path), path
        assert paper_lines[suffix] in _header(path), path
    if table == "table2":
        plus = _config("table2/animal10n_coteaching_plus.flags")
        assert plus.init_epoch == 20  # CIFAR-10's, the 10-class analogue
    jocor = _config(f"{table}/{setting}_jocor.flags")
    assert jocor.co_lambda == 0.9


def test_cross_entropy_is_method_ce_wherever_it_is_meant(at_repo_root):
    # Table 4 takes Table 1's CIFAR-10 CE runs; Tables 2 and 3 have their own.
    ce_files = [
        f for f in reproduce.experiment_files("table4", FLAGS_DIR) if "_ce" in f
    ] + [
        os.path.join(FLAGS_DIR, "table2", "animal10n_ce.flags"),
        os.path.join(FLAGS_DIR, "table3", "clothing1m_ce.flags"),
    ]
    assert len(ce_files) == 6
    for path in ce_files:
        config = train.config_from_flagfile(path)
        assert config.method == "ce" and train.reported_network(config) == "net"
        assert config.warmup_epochs == train.TrainConfig().warmup_epochs, path
        assert config.train_student, path  # no GAL flag is set


def test_flag_files_hold_the_papers_settings(at_repo_root):
    gal = train.config_from_flagfile(
        os.path.join(FLAGS_DIR, "table1/cifar10_sym50.flags")
    )
    assert (gal.backbone, gal.epochs, gal.warmup_epochs, gal.batch_size) == (
        "preact_resnet18",
        200,
        80,
        128,
    )
    assert (gal.lr, gal.lr_decay_epochs, gal.tau, gal.epsilon) == (
        0.06,
        (80, 150),
        0.4,
        0.8,
    )
    assert (gal.momentum, gal.weight_decay, gal.weight_decay_mode) == (
        0.9,
        5e-4,
        "coupled",
    )
    animal = train.config_from_flagfile(
        os.path.join(FLAGS_DIR, "table2/animal10n.flags")
    )
    assert (animal.backbone, animal.epochs, animal.lr, animal.lr_decay_epochs) == (
        "resnet34",
        150,
        0.01,
        (60, 90, 120),
    )
    cloth = train.config_from_flagfile(
        os.path.join(FLAGS_DIR, "table3/clothing1m.flags")
    )
    assert (
        cloth.backbone,
        cloth.pretrained_weights,
        cloth.batch_size,
        cloth.warmup_epochs,
    ) == ("resnet50", "imagenet", 32, 10)
    p = {
        s: train.config_from_flagfile(
            os.path.join(FLAGS_DIR, f"table4/cifar10_{s}_random.flags")
        ).random_update_prob
        for s in ("sym20", "sym50", "sym80", "asym40")
    }
    assert p == {"sym20": 0.8, "sym50": 0.5, "sym80": 0.2, "asym40": 0.6}


@pytest.mark.large
@pytest.mark.parametrize(
    "name, overrides",
    [
        ("table1/cifar10_sym50.flags", {}),
        # PreAct ResNet-18 is dry-run above; this file's peer and CIFAR-100
        # head on the small CNN cost a fifth of the time.
        ("table1/cifar100_sym80_jocor.flags", {"backbone": "small_cnn"}),
    ],
)
def test_representative_flag_files_dry_run(
    name, overrides, tmp_path, monkeypatch, at_repo_root
):
    # A dry run takes 15-30 s per file on 2 CPU cores (ResNet-50's, 75 s), so
    # two files run here: GAL with θC (PreAct ResNet-18) and a two-network peer
    # on CIFAR-100 (on the small CNN); `python -m galkeras.reproduce --table=N
    # --dry_run` runs them all. Every file's flags are parsed above (Table 4's
    # random rule two includes deep among them); the other networks are built
    # and trained by backbones_test (ResNet-34 and ResNet-50) and
    # clothing1m_test (a whole run on on-disk images), the random rule by
    # model_test, CE by methods_test.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = train.config_from_flagfile(
        os.path.join(FLAGS_DIR, name), dry_run=True, verbose=0, **overrides
    )
    summary = train.run(config)
    assert summary["dry_run"] and summary["export_path"] is None
    # Nothing written: the scratch run directory is gone (TensorFlow's autograph
    # keeps its own generated files in the temp folder).
    assert summary["model_dir"] is None
    assert not [f for f in os.listdir(tmp_path) if f.startswith("galkeras-")]
    assert "nothing written" in train.format_summary(summary)
    assert not os.path.exists(os.path.join(REPO, "runs")) or not any(
        "dry" in d for d in os.listdir(os.path.join(REPO, "runs"))
    )


TINY_BASE = """# Tiny protocol shared by the reproduce test's runs; not run by itself.
--dataset=digits
--noise_type=sym
--noise_rate=0.5
--backbone=small_cnn
--backbone_width=4
--epochs=2
--lr_decay_epochs=
--batch_size=64
"""
TINY = """# Tiny {kind} run for the reproduce test.
#   python -m galkeras.train --flagfile={path}
# runtime: seconds. Not a paper setting.
--flagfile=flags/table1/base/digits_sym50.flags
{own}
"""


def _tiny_flags(flags_dir):
    """Table 1 as the repository lays it out: a base, and method files that
    include it by a path relative to the flags directory's parent."""
    os.makedirs(flags_dir / "table1" / "base")
    (flags_dir / "table1" / "base" / "digits_sym50.flags").write_text(TINY_BASE)
    for name, kind, own in (
        ("digits_sym50", "GAL", "--warmup_epochs=1"),
        ("digits_sym50_ce", "CE", "--method=ce"),
    ):
        path = flags_dir / "table1" / f"{name}.flags"
        path.write_text(TINY.format(kind=kind, path=path, own=own))


@pytest.mark.large
def test_reproduce_runs_then_skips_and_writes_the_table(tmp_path, monkeypatch):
    _tiny_flags(tmp_path / "flags")
    monkeypatch.setattr(reproduce, "EXPERIMENTS", {"table1": ("table1/*.flags",)})
    kwargs = dict(
        flags_dir=str(tmp_path / "flags"),
        runs_dir=str(tmp_path / "runs"),
        out=str(tmp_path / "out"),
    )

    def run(command, check, cwd):
        # The planned command, parsed as galkeras.train parses it and run in
        # this process (a second TensorFlow start-up per run would add nothing
        # the CLI tests do not cover). Its flag file's include is relative to
        # `cwd`, the parent of the flags directory.
        assert cwd == str(tmp_path)
        assert command[:3] == [sys.executable, "-m", "galkeras.train"]
        monkeypatch.chdir(cwd)
        train.run(train.config_from_args(command[3:]))
        return subprocess.CompletedProcess(command, 0)

    written = reproduce.reproduce("table1", run=run, **kwargs)
    table_path = str(tmp_path / "out" / "table1" / "table.md")
    assert written == [table_path]
    summaries = {
        name: json.loads(
            (tmp_path / "runs" / "table1" / f"{name}_s0" / "summary.json").read_text()
        )
        for name in ("digits_sym50", "digits_sym50_ce")
    }
    table = open(table_path).read()
    # The cells are the summaries' numbers: θC for GAL, CE's one network.
    gal, ce = (
        summaries["digits_sym50"]["student"],
        summaries["digits_sym50_ce"]["net"],
    )

    def row(label, r):
        cells = (r["best"], r["last"], r["best_minus_last"])
        return f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |"

    assert row("Cross Entropy", ce) in table and row("GAL", gal) in table
    assert "Digits Sym 50%" in table or "digits Sym 50%" in table

    # Finished runs are skipped: the runner must not be called again.
    lines = []

    def must_not_run(command, check, cwd):
        raise AssertionError(f"ran {command}")

    reproduce.reproduce("table1", run=must_not_run, log=lines.append, **kwargs)
    assert sum("finished earlier, skipped" in line for line in lines) == 2
    assert open(table_path).read() == table_markdown(
        [load_run(str(tmp_path / "runs" / "table1" / f"{n}_s0")) for n in summaries],
        paper_methods=True,
    )


def test_unfinished_run_and_failing_run_are_refused_by_name(tmp_path, monkeypatch):
    _tiny_flags(tmp_path / "flags")
    monkeypatch.setattr(reproduce, "EXPERIMENTS", {"table1": ("table1/*.flags",)})
    kwargs = dict(
        flags_dir=str(tmp_path / "flags"),
        runs_dir=str(tmp_path / "runs"),
        out=str(tmp_path / "out"),
    )
    stuck = tmp_path / "runs" / "table1" / "digits_sym50_ce_s0"
    os.makedirs(stuck)
    (stuck / "history.csv").write_text("epoch\n0\n")

    def must_not_run(command, check, cwd):
        raise AssertionError("no run may start")

    with pytest.raises(reproduce.ReproduceError, match="digits_sym50_ce_s0"):
        reproduce.reproduce("table1", run=must_not_run, **kwargs)
    assert (stuck / "history.csv").exists()  # nothing a user made is lost
    os.remove(stuck / "history.csv")

    class Failed:
        returncode = 2

    with pytest.raises(
        reproduce.ReproduceError, match=r"digits_sym50\.flags .* exit code 2"
    ):
        reproduce.reproduce("table1", run=lambda c, check, cwd: Failed(), **kwargs)


def test_runs_start_in_the_repository_root_with_absolute_paths(tmp_path, monkeypatch):
    # From any directory: each run's nested `--flagfile=flags/...` lines must
    # resolve, so it starts in the parent of the flags directory, and the paths
    # it is given (which were relative to the caller's directory) are absolute.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        reproduce, "EXPERIMENTS", {"table1": ("table1/cifar10_sym50*.flags",)}
    )
    started = []

    class Finished:
        returncode = 0

    def run(command, check, cwd):
        assert cwd == REPO
        args = dict(a[2:].split("=", 1) for a in command if a.startswith("--"))
        assert all(
            os.path.isabs(args[k]) for k in ("flagfile", "model_dir", "export_dir")
        )
        assert args["data_dir"] == str(tmp_path / "data")
        with reproduce.working_directory(cwd):
            started.append(train.config_from_flagfile(args["flagfile"]).method)
        return Finished()

    monkeypatch.setattr("galkeras.report.write_experiment", lambda *args: ["table.md"])
    reproduce.reproduce(
        "table1",
        flags_dir=os.path.relpath(FLAGS_DIR),
        runs_dir="runs",
        data_dir="data",
        run=run,
        log=lambda line: None,
    )
    assert started == ["gal", "ce", "coteaching", "coteaching_plus", "jocor"]


def test_cli_refuses_bad_requests_with_exit_2(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for args, named in (
        ([], "exactly one of --table and --figure"),
        (["--table=1", "--figure=4"], "exactly one"),
        (["--table=1", f"--flags_dir={tmp_path / 'none'}"], "--flags_dir"),
    ):
        result = subprocess.run(
            [os.sys.executable, "-m", "galkeras.reproduce", *args],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert result.returncode == 2 and named in result.stderr, result.stderr
