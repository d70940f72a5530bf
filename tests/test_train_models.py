"""train.py end to end with the free-form models (residual flows, FFJORD), TarFlow and the
memory-saving flag: a few steps each at tiny sizes (a preset added for the test), resumed
bit-exactly, with what each logs and how each is evaluated; under bf16, compile and torchrun
with two processes (there RealNVP too, for the classic models)."""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

import train
from models import MODELS
from models.tarflow import TarFlow
from models.training import loop
from models.training.checkpoints import load_checkpoint
from models.training.metrics_log import read_metrics
from tests.conftest import ROOT

FAST = ["--device", "cpu", "--log-every", "2", "--num-samples", "4", "--batch-size", "16", "--warmup", "2"]
TINY = {
    "residual": dict(num_scales=1, num_steps=1, hidden_features=8, logdet_mode="estimate"),
    "ffjord": dict(num_steps=1, hidden_features=8, num_blocks=0, atol=1e-4, rtol=1e-4),
    "tarflow": dict(patch_size=4, hidden_features=8, num_steps=2, num_blocks=1, num_heads=1, noise_std=0.05,
                    context_dropout=0.2),
    "realnvp": dict(num_scales=1, num_steps=2, hidden_features=4, num_blocks=0),
    "glow": dict(num_scales=1, num_steps=2, hidden_features=4, num_blocks=0),
}


@pytest.fixture(autouse=True)
def tiny_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--preset tiny``: each model at test sizes."""
    for name, sizes in TINY.items():
        monkeypatch.setitem(MODELS[name].PRESETS, "tiny", sizes)


def points(tmp: Path) -> str:
    """A file of 120 vectors of D = 3 (108 train, 12 test)."""
    path = tmp / "points.npy"
    numpy.save(path, numpy.random.default_rng(0).standard_normal((120, 3)) * [1.0, 2.0, 0.5])
    return str(path)


def run(out: Path, *flags: str) -> int:
    return train.main([*FAST, "--out", str(out), "--preset", "tiny", *flags])


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in records]


def assert_resumes_exactly(tmp: Path, monkeypatch: pytest.MonkeyPatch, *flags: str) -> Path:
    """Runs straight, then interrupted after step 3 (SIGINT) and resumed: the same parameters
    and training records. Returns the straight run's folder."""
    assert run(tmp / "straight", *flags) == 0
    step, calls = loop.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted_step)
    assert run(tmp / "resumed", *flags) == 130
    monkeypatch.setattr(loop, "train_step", step)
    assert train.main([*FAST, "--resume", str(tmp / "resumed" / "checkpoint.pt")]) == 0
    straight, resumed = (load_checkpoint(tmp / name / "checkpoint.pt") for name in ("straight", "resumed"))
    assert straight["step"] == resumed["step"] == 4
    for (name, a), b in zip(straight["model"].items(), resumed["model"].values(), strict=True):
        assert torch.equal(a, b), name
    assert without_timing(train_records(tmp / "straight")) == without_timing(train_records(tmp / "resumed"))
    return tmp / "straight"


def test_residual_trains_on_estimates_evaluates_exactly_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    out = assert_resumes_exactly(tmp_path, monkeypatch, "--model", "residual", "--dataset", points(tmp_path),
                                 "--steps", "4")
    records = train_records(out)
    assert [r["logdet_mode"] for r in records] == ["estimate", "estimate"] and "bits_per_dim" in records[0]
    test = read_metrics(out / "metrics.jsonl")[-1]
    assert test["split"] == "test" and test["logdet_mode"] == "exact" and "passes" not in test  # D = 3 <= 64
    assert "the training NLL is an unbiased estimate" in capsys.readouterr().out


def test_gradient_mode_logs_a_surrogate_and_evaluation_estimates(tmp_path: Path, capsys) -> None:
    assert run(tmp_path, "--model", "residual", "--dataset", points(tmp_path), "--steps", "2", "--logdet-mode",
               "gradient", "--eval-logdet", "estimate", "--eval-passes", "3") == 0
    (record,) = train_records(tmp_path)
    assert record["logdet_mode"] == "gradient" and math.isfinite(record["surrogate_loss"])
    assert not {"loss", "bits_per_dim", "log_p", "logdet"} & set(record)
    test = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert test["logdet_mode"] == "estimate" and test["passes"] == 3
    assert 0 < test["bits_per_dim_estimator_stderr"] < 1 and math.isfinite(test["bits_per_dim"])
    out, err = capsys.readouterr()
    assert out.count("--logdet-mode gradient trains on a surrogate") == 1 and "over 3 passes" in out
    assert "surrogate=" in err and "bpd" not in err  # the progress bar
    assert (tmp_path / "loss.png").exists()


def test_ffjord_logs_function_evaluations_and_its_rnode_penalty(tmp_path: Path, monkeypatch) -> None:
    out = assert_resumes_exactly(tmp_path, monkeypatch, "--model", "ffjord", "--dataset", points(tmp_path),
                                 "--steps", "4", "--kinetic-energy", "0.1", "--jacobian-norm", "0.1")
    records = train_records(out)
    assert all(r["nfe_forward"] >= 6 and r["nfe_backward"] == 0 and r["regularization"] > 0 for r in records)
    assert "logdet_mode" not in records[0]  # exact trace: the loss is the NLL
    assert read_metrics(out / "metrics.jsonl")[-1]["logdet_mode"] == "exact"


def test_tarflow_augments_training_batches_and_guides_its_samples(tmp_path: Path, monkeypatch) -> None:
    augmented, sampled = [], []
    augment, sample = TarFlow.augment, TarFlow.sample
    monkeypatch.setattr(TarFlow, "augment", lambda self, x, context=None: (
        augmented.append((x.shape, self.training)), augment(self, x, context))[1])

    @functools.wraps(sample)  # its signature too: train.py checks that the model takes guidance
    def recorded_sample(self, *args, **kwargs):
        sampled.append((kwargs["guidance"], kwargs["denoise"]))
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(TarFlow, "sample", recorded_sample)
    out = assert_resumes_exactly(tmp_path, monkeypatch, "--model", "tarflow", "--conditional", "--guidance", "2",
                                 "--steps", "4")
    # Straight, interrupted (3 steps) and resumed runs: one call per training step, never in evaluation.
    assert augmented == [(torch.Size([16, 1, 8, 8]), True)] * (4 + 3 + 1)
    assert sampled == [(2.0, True)] * 2  # samples.png of the two runs that finished
    assert (out / "samples.png").stat().st_size > 1000


# bf16, compile and several processes, as for the other models

NEW_MODELS = ("residual", "ffjord", "tarflow")


def data_flags(name: str, tmp: Path) -> list[str]:
    """TarFlow on the digits (images), the free-form models on a file of vectors."""
    return [] if name == "tarflow" else ["--dataset", points(tmp)]


@pytest.mark.parametrize("name", NEW_MODELS)
def test_the_new_models_train_under_bf16_autocast(tmp_path: Path, name: str) -> None:
    torch.set_default_dtype(torch.float32)  # as train.py runs outside the tests: autocast leaves float64 alone
    flags = ["--model", name, "--steps", "4", "--ckpt-every", "0", *data_flags(name, tmp_path)]
    assert run(tmp_path / "fp32", *flags) == 0
    assert run(tmp_path / "bf16", *flags, "--amp", "bf16") == 0
    plain, record = train_records(tmp_path / "fp32")[-1], train_records(tmp_path / "bf16")[-1]  # off the identity
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
    # Autocast ran (bf16 rounds the networks' outputs) and stayed close to float32.
    assert record["loss"] != plain["loss"] and record["loss"] == pytest.approx(plain["loss"], rel=0.05)
    assert math.isfinite(read_metrics(tmp_path / "bf16" / "metrics.jsonl")[-1]["bits_per_dim"])


def test_tarflow_trains_compiled(tmp_path: Path, monkeypatch) -> None:
    compiled, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: (compiled.append(type(model).__name__),
                                                                    compile(model, **kwargs))[1])
    assert run(tmp_path, "--model", "tarflow", "--steps", "2", "--compile") == 0
    assert compiled and math.isfinite(train_records(tmp_path)[0]["loss"])


TORCHRUN_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import train
from models import MODELS
for name, sizes in {tiny!r}.items():
    MODELS[name].PRESETS["tiny"] = sizes
name, out, *data = sys.argv[1:]
sys.exit(train.main({fast!r} + ["--preset", "tiny", "--model", name, "--steps", "4", "--out", out, *data]))
"""


@pytest.mark.parametrize("name", ["realnvp", *NEW_MODELS])
def test_torchrun_with_two_cpu_processes_writes_one_run(tmp_path: Path, name: str) -> None:
    script = tmp_path / "tiny_train.py"  # train.py with the tiny presets of this file
    script.write_text(TORCHRUN_SCRIPT.format(root=str(ROOT), tiny=TINY, fast=FAST))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               name, str(tmp_path / "run"), *data_flags(name, tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("test: ") == 1  # rank 0 alone prints
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == [("train", 2), ("train", 4), ("test", 4)]
    assert all(math.isfinite(r["bits_per_dim"]) for r in records if "bits_per_dim" in r)


@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_invertible_backprop_trains_with_the_same_loss(tmp_path: Path, name: str) -> None:
    flags = ["--model", name, "--steps", "3", "--ckpt-every", "0"]
    assert run(tmp_path / "plain", *flags) == 0
    assert run(tmp_path / "saving", *flags, "--invertible-backprop") == 0
    plain, saving = train_records(tmp_path / "plain"), train_records(tmp_path / "saving")
    for a, b in zip(plain, saving, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["logdet"] == pytest.approx(a["logdet"], rel=1e-6)
        assert 0 <= b["reconstruction_error"] < 1e-3 and "reconstruction_error" not in a
    ours, theirs = (load_checkpoint(tmp_path / run_dir / "checkpoint.pt")["model"] for run_dir in ("saving", "plain"))
    assert ours.keys() == theirs.keys()  # the plain model's state
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-6, msg=key)
    # Its checkpoint resumes without the flag (and the change is recorded).
    assert train.main([*FAST, "--resume", str(tmp_path / "saving" / "checkpoint.pt"), "--steps", "4",
                       "--no-invertible-backprop"]) == 0
    assert read_metrics(tmp_path / "saving" / "metrics.jsonl")[-3]["changed"] == {"invertible_backprop": [True, False],
                                                                                  "steps": [3, 4]}


@pytest.mark.parametrize(("flags", "match"), [
    (["--model", "maf", "--preset", "toy2d", "--dataset", "two_moons", "--invertible-backprop"],
     r"--invertible-backprop cannot train maf: .*MaskedAffineAutoregressive at transform\.flows\.0, whose inverse is "
     r"iterative"),
    (["--model", "tarflow", "--guidance", "2"],
     r"--guidance expected a class-conditional tarflow .*, got --model tarflow$"),
    (["--model", "realnvp", "--conditional", "--guidance", "2"], r"got --model realnvp --conditional$"),
    (["--model", "realnvp", "--logdet-mode", "exact"], r"--logdet-mode expected a model with free-form log-dets"),
    (["--model", "ffjord", "--logdet-mode", "gradient"], r"--logdet-mode expected one of exact, estimate for ffjord"),
    (["--model", "nsf", "--kinetic-energy", "0.1"], r"--kinetic-energy expected a continuous-flow model \(ffjord\)"),
    (["--model", "ffjord", "--jacobian-norm", "-1"], r"--jacobian-norm expected a number >= 0, got -1.0"),
    (["--model", "residual", "--eval-passes", "1"], r"--eval-passes expected at least 2 \(a standard error"),
])
def test_options_a_run_cannot_take_are_refused_before_anything_is_written(tmp_path: Path, flags, match) -> None:
    with pytest.raises(ValueError, match=match):
        train.main(["--device", "cpu", "--out", str(tmp_path / "run"), *flags])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("name", "preset"), [(n, p) for n in ("residual", "ffjord", "tarflow")
                                              for p in ("toy2d", "digits")])
def test_the_new_models_take_the_toy2d_and_digits_run_settings(name: str, preset: str) -> None:
    config, _ = train.resolve_config(["--model", name, "--preset", preset])
    assert config.dataset == train.PRESETS[preset]["dataset"] and config.steps == train.PRESETS[preset]["steps"]
    for tabular in ("power", "gas", "hepmass", "miniboone", "bsds300"):
        if tabular in MODELS[name].PRESETS:
            assert train.resolve_config(["--model", name, "--preset", tabular])[0].dataset == tabular
