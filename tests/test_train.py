"""Tests of train.py, the command line: runs end to end on the embedded digits (a few steps each)."""

from __future__ import annotations

import dataclasses
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
from models.training.checkpoints import load_checkpoint
from models.training.metrics_log import read_metrics

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
    assert names == {"config.json", "metrics.jsonl", "checkpoint.pt", "samples.png", "loss.png"}
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
    mismatch = r"resume expected a checkpoint of the model being built \(glow with .*got nice"
    with pytest.raises(ValueError, match=mismatch):
        train.main([*FAST, "--resume", str(tmp_path / "first" / "checkpoint.pt"), "--model", "glow"])
    with pytest.raises(ValueError, match=r"resume expected a checkpoint of the model being built"):
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


def test_torchrun_with_two_cpu_processes_writes_one_run(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
               *FAST, "--model", "nice", "--steps", "4", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("test: ") == 1  # rank 0 alone prints
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == [("train", 2), ("train", 4), ("test", 4)]
