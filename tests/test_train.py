"""Tests of train.py, the command line: runs end to end on the embedded digits (a few steps each)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

import train
from models.data import load_dataset
from models.training import loop
from models.training.checkpoints import load_checkpoint, save_checkpoint
from models.training.metrics_log import read_metrics
from tests.models.training.standins import hold_lock

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--log-every", "2", "--num-samples", "4"]


def run(tmp: Path, *flags: str) -> int:
    return train.main([*FAST, "--out", str(tmp), *flags])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    for field in dataclasses.fields(train.Config):
        assert f"--{field.name.replace('_', '-')}" in text
        assert " ".join(field.metadata["help"].split()) in text
    assert "torchrun --standalone" in text and "Run settings of the presets: digits:" in text


def test_a_short_run_writes_config_metrics_checkpoint_and_pictures(tmp_path: Path, capsys) -> None:
    assert run(tmp_path, "--model", "realnvp", "--epochs", "0.1", "--batch-size", "64", "--eval-every", "2") == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {".lock", "config.json", "metrics.jsonl", "checkpoint.pt", "samples.png", "loss.png"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == "realnvp" and config["steps"] == 3  # ceil(0.1 * (1497 // 64))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == [("train", 2), ("test", 2), ("train", 3), ("test", 3)]
    assert all(r["bits_per_dim"] > 0 for r in records)
    out = capsys.readouterr().out
    assert "test: " in out and "bits/dim" in out and f"wrote {tmp_path}/" in out


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    flags = ["--model", "glow", "--steps", "6", "--warmup", "2", "--ckpt-every", "0"]
    assert run(tmp_path / "straight", *flags) == 0
    calls = []
    step = loop.train_step  # the step fit calls

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C during step 3: the loop stops after it
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted_step)
    assert run(tmp_path / "resumed", *flags) == 130
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 3
    monkeypatch.setattr(loop, "train_step", step)
    assert train.main([*FAST, "--resume", str(tmp_path / "resumed" / "checkpoint.pt")]) == 0
    for (name, a), b in zip(tensors(tmp_path / "straight" / "checkpoint.pt").items(),
                            tensors(tmp_path / "resumed" / "checkpoint.pt").values(), strict=True):
        assert torch.equal(a, b), name

    def train_records(run_dir: str) -> list[tuple]:
        rows = read_metrics(tmp_path / run_dir / "metrics.jsonl")
        return [(r["step"], r["loss"], r["lr"]) for r in rows if r["split"] == "train"]

    assert train_records("straight") == train_records("resumed")


def test_eval_only_evaluates_a_checkpoint_without_training(tmp_path: Path, capsys) -> None:
    run(tmp_path, "--model", "nice", "--steps", "2")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert train.main([*FAST, "--resume", str(tmp_path / "checkpoint.pt"), "--eval-only", "--temperature", "0.5"]) == 0
    assert "test: " in capsys.readouterr().out
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_a_2d_toy_run_draws_the_learned_and_true_densities(tmp_path: Path) -> None:
    assert run(tmp_path, "--model", "realnvp", "--preset", "toy2d", "--steps", "2", "--batch-size", "32") == 0
    assert (tmp_path / "density.png").stat().st_size > 1000


def test_a_conditional_toy_run_draws_each_class_and_reports_the_conditional_gap(tmp_path: Path, capsys) -> None:
    assert run(tmp_path, "--model", "nsf", "--preset", "toy2d", "--dataset", "two_moons", "--conditional",
               "--steps", "2", "--batch-size", "32") == 0
    assert (tmp_path / "density.png").stat().st_size > 1000
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["model_config"]["context_features"] == 2 and payload["config"]["conditional"] is True
    final = read_metrics(tmp_path / "metrics.jsonl")[-1]
    floor = load_dataset("two_moons").density.conditional_entropy()[0] / 2
    assert final["split"] == "test" and final["entropy_per_dim"] == pytest.approx(floor, rel=1e-12)
    assert "(H(X | class))" in capsys.readouterr().out


def test_a_conditional_digits_run_resumes_with_its_context(tmp_path: Path) -> None:
    assert run(tmp_path, "--conditional", "--model", "glow", "--steps", "2", "--batch-size", "32") == 0
    assert train.main([*FAST, "--resume", str(tmp_path / "checkpoint.pt"), "--steps", "3"]) == 0
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["step"] == 3 and payload["model_config"]["context_features"] == 10


def test_a_tabular_preset_picks_its_data_set() -> None:
    config, _ = train.resolve_config(["--model", "nsf", "--preset", "hepmass"])
    assert config.dataset == "hepmass" and config.out == str(Path("runs") / "nsf-hepmass")
    config, _ = train.resolve_config(["--model", "maf", "--preset", "power", "--dataset", "mixture10d"])
    assert config.dataset == "mixture10d"  # a flag given wins over the preset


@pytest.mark.parametrize(("preset", "batch_size", "lr", "steps"), [
    ("power", 512, 5e-4, 400_000), ("gas", 512, 5e-4, 400_000), ("hepmass", 256, 5e-4, 400_000),
    ("miniboone", 128, 3e-4, 200_000), ("bsds300", 512, 5e-4, 400_000),
])
def test_tabular_presets_train_with_the_nsf_papers_settings(preset, batch_size, lr, steps) -> None:
    # Durkan et al. 2019, arXiv:1906.04032, appendix B.
    config, _ = train.resolve_config(["--model", "nsf", "--preset", preset])
    assert (config.batch_size, config.lr, config.steps) == (batch_size, lr, steps)
    config, _ = train.resolve_config(["--model", "nsf", "--preset", preset, "--lr", "1e-3"])
    assert config.lr == 1e-3  # a flag given wins


def test_a_config_is_checked_when_made_and_never_changed() -> None:
    config = train.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 0
    with pytest.raises(ValueError, match=r"--steps expected a positive integer, got 0"):
        dataclasses.replace(config, steps=0)
    epochs = dataclasses.replace(config, epochs=0.5, batch_size=64)
    assert train.with_epochs_as_steps(epochs, 1497, 1).steps == 12  # ceil(0.5 * (1497 // 64))
    assert train.with_epochs_as_steps(config, 1497, 1) is config  # no --epochs: unchanged
    with pytest.raises(ValueError, match=r"--epochs expected an epoch of at least one batch, got 100 training samples"):
        train.with_epochs_as_steps(epochs, 100, 2)


def test_every_field_carries_its_flag_help() -> None:
    for field in dataclasses.fields(train.Config):
        assert field.metadata["help"].strip(), field.name


def test_conditional_on_a_set_without_labels_fails_before_writing(tmp_path: Path) -> None:
    (tmp_path / "data" / "power").mkdir(parents=True)
    numpy.save(tmp_path / "data" / "power" / "data.npy", numpy.random.default_rng(0).normal(size=(400, 8)))
    with pytest.raises(ValueError, match=r"a class-conditional model expected a data set with class labels .*'power'"):
        run(tmp_path / "run", "--model", "maf", "--preset", "small", "--dataset", "power", "--conditional",
            "--data-dir", str(tmp_path / "data"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, error, match",
    [
        (["--model", "flowy"], ValueError, r"--model expected one of nice, realnvp, glow.*, got 'flowy'"),
        (["--dataset", "imagenet"], ValueError, r"--dataset expected one of .*digits.*, got 'imagenet'"),
        (["--preset", "huge"], ValueError, r"--preset expected one of .* for realnvp, got 'huge'"),
        (["--steps", "0"], ValueError, r"--steps expected a positive integer, got 0"),
        (["--steps", "5", "--epochs", "1"], ValueError, r"expected --steps or --epochs, got both"),
        (["--eval-only"], ValueError, r"--eval-only expected a checkpoint to evaluate \(--resume PATH\), got none"),
        (["--resume", "missing.pt"], FileNotFoundError,
         r"checkpoint expected a file written by train.py, got 'missing.pt'"),
    ],
)
def test_bad_input_fails_before_writing_anything(tmp_path: Path, flags, error, match) -> None:
    with pytest.raises(error, match=match):
        run(tmp_path / "run", *flags)
    assert not (tmp_path / "run").exists()


def test_a_data_dir_without_the_files_fails_before_writing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"MNIST: expected train-images-idx3-ubyte.gz.* not found"):
        run(tmp_path / "run", "--dataset", "mnist", "--preset", "mnist", "--data-dir", str(tmp_path / "empty"))
    assert not (tmp_path / "run").exists()


def test_resuming_another_models_checkpoint_fails_and_changes_nothing(tmp_path: Path) -> None:
    run(tmp_path / "first", "--model", "nice", "--steps", "2")
    files = {p.name: p.read_bytes() for p in (tmp_path / "first").iterdir()}
    mismatch = r"--model glow differs from the checkpoint's nice \(.*first/checkpoint.pt\): a resumed run keeps"
    with pytest.raises(ValueError, match=mismatch):
        train.main([*FAST, "--resume", str(tmp_path / "first" / "checkpoint.pt"), "--model", "glow"])
    with pytest.raises(ValueError, match=r"--model realnvp differs from the checkpoint's nice"):
        train.main([*FAST, "--resume", str(tmp_path / "first" / "checkpoint.pt"), "--model", "realnvp",
                    "--out", str(tmp_path / "second")])
    assert not (tmp_path / "second").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "first").iterdir()} == files


def test_a_fresh_run_never_replaces_another_runs_checkpoint(tmp_path: Path) -> None:
    run(tmp_path, "--model", "nice", "--steps", "2")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"--out expected a directory without a checkpoint, got .* --resume"):
        run(tmp_path, "--model", "nice", "--steps", "2")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert run(tmp_path, "--model", "nice", "--steps", "2", "--overwrite") == 0


# Runs that never mix or misreport


@pytest.fixture
def points(tmp_path: Path) -> Path:
    """A file of 200 3-D vectors: a quick data set (20 test rows) for runs of MAF's small preset."""
    path = tmp_path / "points.npy"
    numpy.save(path, numpy.random.default_rng(0).normal(size=(200, 3)) @ numpy.diag([1.0, 2.0, 0.5]))
    return path


def vector_run(out: Path, points: Path, *flags: str) -> int:
    return run(out, "--model", "maf", "--preset", "small", "--dataset", str(points), "--batch-size", "16",
               "--warmup", "2", *flags)


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".lock"}


def test_a_file_of_vectors_trains_with_a_held_out_test_split(tmp_path: Path, points: Path, capsys) -> None:
    assert vector_run(tmp_path / "run", points, "--steps", "2") == 0
    assert "points.npy (162 train / 20 test, shape (3,))" in capsys.readouterr().out  # 200 = 162 + 18 + 20
    config, _ = train.resolve_config(["--dataset", "some/where/points.csv"])
    assert config.out == str(Path("runs") / "realnvp-points")


@pytest.mark.parametrize(("name", "content", "error", "match"), [
    ("missing.npy", None, FileNotFoundError, r"load_vectors expected a file at .*missing\.npy, not found"),
    ("bad.npy", b"not an array", ValueError, r"expected a NumPy \.npy array in .*bad\.npy, got a file that cannot"),
    ("bad.csv", b"1,2\n3,four\n", ValueError, r"expected comma-separated numbers in .*bad\.csv"),
    ("nine.npy", "nine", ValueError, r"nine test split expected at least one sample, got none"),
    ("points.txt", None, ValueError, r"--dataset expected one of .*, or a \.npy or \.csv file of vectors, got"),
])
def test_a_bad_data_file_fails_before_writing(tmp_path: Path, name, content, error, match) -> None:
    if content == "nine":  # 9 rows: int(0.1 * 9) = 0 held out, an empty test split
        numpy.save(tmp_path / name, numpy.ones((9, 2)))
    elif content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=match):
        vector_run(tmp_path / "run", tmp_path / name, "--steps", "2")
    assert not (tmp_path / "run").exists()


def test_resuming_into_another_runs_folder_is_refused_and_changes_nothing(tmp_path: Path, points: Path) -> None:
    assert vector_run(tmp_path / "a", points, "--steps", "4", "--ckpt-every", "2") == 0
    assert vector_run(tmp_path / "b", points, "--steps", "2", "--seed", "1") == 0
    a, b = contents(tmp_path / "a"), contents(tmp_path / "b")
    resume = [*FAST, "--resume", str(tmp_path / "a" / "checkpoint.pt"), "--steps", "6", "--out", str(tmp_path / "b")]
    with pytest.raises(FileExistsError, match=r"--out expected a new or empty folder for a run resumed from .*a, got "
                                              r".*b' holding another run's files \(config.json, metrics.jsonl, "
                                              r"checkpoint.pt, samples.png, loss.png\)"):
        train.main(resume)
    assert contents(tmp_path / "a") == a and contents(tmp_path / "b") == b
    assert train.main([*resume, "--overwrite"]) == 0  # B becomes A's continuation; A is left as it was
    assert contents(tmp_path / "a") == a
    records = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == [
        ("train", 2), ("train", 4), ("test", 4), ("resume", 4), ("train", 6), ("test", 6)]  # A's history, then B's
    assert records[:2] == read_metrics(tmp_path / "a" / "metrics.jsonl")[:2]
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 6


def test_a_new_learning_rate_on_resume_is_applied_and_recorded(tmp_path: Path, points: Path, capsys) -> None:
    assert vector_run(tmp_path, points, "--steps", "4", "--schedule", "constant") == 0
    capsys.readouterr()
    assert train.main([*FAST, "--resume", str(tmp_path / "checkpoint.pt"), "--steps", "6", "--lr", "5e-4"]) == 0
    assert "resuming from step 4 of 6" in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 5e-4
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert {"split": "resume", "step": 4, "changed": {"steps": [4, 6], "lr": [1e-3, 5e-4]}} in records
    assert [r["lr"] for r in records if r["split"] == "train"] == [1e-3, 1e-3, 5e-4]  # steps 2, 4, 6
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["optimizer"]["param_groups"][0]["lr"] == 5e-4 and payload["scheduler"]["base_lrs"] == [5e-4]
    assert payload["config"]["lr"] == 5e-4


@pytest.mark.parametrize(("flags", "match"), [
    (["--seed", "3"], r"--seed 3 differs from the checkpoint's 0 \(.*checkpoint.pt\): a resumed run keeps"),
    (["--batch-size", "8"], r"--batch-size 8 differs from the checkpoint's 16"),
    (["--steps", "2"], r"--steps 2 is below the checkpoint's step 4 \(.*\): that run is past it already"),
])
def test_resume_refuses_what_would_make_another_run(tmp_path: Path, points: Path, flags, match) -> None:
    assert vector_run(tmp_path, points, "--steps", "4") == 0
    before = contents(tmp_path)
    with pytest.raises(ValueError, match=match):
        train.main([*FAST, "--resume", str(tmp_path / "checkpoint.pt"), *flags])
    assert contents(tmp_path) == before


def test_resume_refuses_other_data_of_the_same_shape(tmp_path: Path, points: Path) -> None:
    assert vector_run(tmp_path / "run", points, "--steps", "2") == 0
    numpy.save(points, numpy.load(points)[::-1].copy())  # the same rows in another order
    with pytest.raises(ValueError, match=r"resume expected the data set the checkpoint was trained on, got other data "
                                         r"\(the same sizes and shape, other values\)"):
        train.main([*FAST, "--resume", str(tmp_path / "run" / "checkpoint.pt"), "--steps", "4"])


def test_resume_refuses_another_process_count_unless_allowed(tmp_path: Path, points: Path, capsys) -> None:
    assert vector_run(tmp_path, points, "--steps", "2") == 0
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    payload["world_size"] = 2  # as if written under torchrun with two processes
    save_checkpoint(payload, tmp_path / "checkpoint.pt")
    resume = [*FAST, "--resume", str(tmp_path / "checkpoint.pt"), "--steps", "4"]
    with pytest.raises(ValueError, match=r"resume expected the checkpoint's process count \(2\), got 1"):
        train.main(resume)
    assert train.main([*resume, "--allow-new-world-size"]) == 0
    capsys.readouterr()
    assert train.main([*FAST, "--resume", str(tmp_path / "checkpoint.pt")]) == 0  # at step 4 of 4
    assert "the checkpoint is at step 4 = --steps: nothing to train, evaluating it" in capsys.readouterr().out


@pytest.mark.parametrize("fault", ["truncated", "flipped byte", "empty"])
def test_a_corrupt_checkpoint_is_a_one_line_error_never_a_traceback(tmp_path: Path, points: Path, fault) -> None:
    assert vector_run(tmp_path, points, "--steps", "2") == 0
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    if fault == "flipped byte":
        data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data[: len(data) - 100] if fault == "truncated" else b"" if fault == "empty" else data))
    result = subprocess.run([sys.executable, "train.py", "--resume", str(path), "--device", "cpu"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    words = {"truncated": "is truncated or padded", "flipped byte": "is corrupt: its SHA-256 differs",
             "empty": "is empty (0 bytes)"}[fault]
    assert result.returncode == 2 and result.stderr == f"train.py: error: checkpoint '{path}' {words}" + \
        result.stderr.split(words, 1)[1] and result.stderr.count("\n") == 1, result.stderr


def test_a_full_disk_stops_naming_the_file_and_keeps_the_last_good_checkpoint(tmp_path: Path, points: Path,
                                                                              monkeypatch) -> None:
    from models.training import files

    write = files._write

    def disk_full_at_the_second_checkpoint(stream, data):
        if data.startswith(b"jacflow-checkpoint") and (tmp_path / "checkpoint.pt").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(stream, data)

    monkeypatch.setattr(files, "_write", disk_full_at_the_second_checkpoint)
    message = (r"cannot write .*checkpoint.pt: No space left on device \(the disk is full; free some space\)\. Last "
               r"good checkpoint: .*checkpoint.pt \(step 2\), left in place")
    with pytest.raises(OSError, match=message):
        vector_run(tmp_path, points, "--steps", "6", "--ckpt-every", "2")
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_a_read_only_output_folder_fails_before_training_naming_it(tmp_path: Path, points: Path,
                                                                   monkeypatch) -> None:
    real_open = os.open

    def read_only(path, *args, **kwargs):  # a read-only folder (chmod does not stop root, who runs CI here)
        if str(path).startswith(str(tmp_path / "run")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError, match=r"cannot write .*run/\.lock: Permission denied \(the folder is not writable; "
                                      r"choose another --out or fix its permissions\)"):
        vector_run(tmp_path / "run", points, "--steps", "2")
    assert list((tmp_path / "run").iterdir()) == []


def test_a_second_run_on_the_same_folder_fails_at_once(tmp_path: Path, points: Path, monkeypatch) -> None:
    (tmp_path / "run").mkdir()
    holder = hold_lock(tmp_path / "run" / ".lock")
    try:
        with pytest.raises(OSError, match=rf"--out {tmp_path / 'run'} is in use by another train.py run "
                                          rf"\(pid {holder.pid}, holding .*\.lock\)"):
            vector_run(tmp_path / "run", points, "--steps", "2")
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]
    finally:
        holder.communicate("")
    errors = []
    step = loop.train_step

    def step_with_a_second_writer(*args, **kwargs):  # while the first run trains, a second one starts
        if not errors:
            with pytest.raises(OSError, match=r"is in use by another train.py run \(pid " + str(os.getpid())) as info:
                vector_run(tmp_path / "run", points, "--steps", "2", "--overwrite")
            errors.append(info.value)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step_with_a_second_writer)
    assert vector_run(tmp_path / "run", points, "--steps", "3") == 0 and errors
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == [("train", 2), ("train", 3), ("test", 3)]  # one run's


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path: Path, points: Path, monkeypatch, capsys) -> None:
    step = loop.train_step

    def terminated_step(*args, **kwargs):
        if terminated_step.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        terminated_step.calls += 1
        return step(*args, **kwargs)

    terminated_step.calls = 0
    monkeypatch.setattr(loop, "train_step", terminated_step)
    assert vector_run(tmp_path, points, "--steps", "6") == 143
    assert "terminated at step 3: checkpoint written" in capsys.readouterr().out
    monkeypatch.setattr(loop, "train_step", step)
    assert train.main([*FAST, "--resume", str(tmp_path / "checkpoint.pt")]) == 0
    assert "resuming from step 3 of 6" in capsys.readouterr().out
