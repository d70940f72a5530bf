"""Tests of benchmarks/gpu_check.py: its CPU mode runs every part but the compile one at tiny sizes, so
the GPU check cannot rot; a failed or slow part fails the check; the CPU figure is read from README."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_the_cpu_mode_runs_the_check_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[-6:-2] if line.strip()}
    assert rows == {"part": "result", "glow-fp32": "ok", "glow-bf16": "ok", "digits": "ok"}
    assert "3 of 3 parts ok" in result.stdout
    assert (tmp_path / "digits" / "metrics.jsonl").exists()


def test_a_failed_part_fails_the_check(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(gpu_check, "run_part", lambda part, cpu, out, limit: gpu_check.Result(
        part, part != "glow-bf16", "broken" if part == "glow-bf16" else "fine", 10.0, 1.5))
    assert gpu_check.main(["--cpu", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "glow-bf16     FAIL          10      1.50  broken" in out and "2 of 3 parts ok" in out


def test_a_part_out_of_time_fails(tmp_path: Path) -> None:
    result = gpu_check.run_part("glow-fp32", True, tmp_path, limit=0.01)
    assert not result.ok and result.note == "ran out of its 0 s"


def test_bad_arguments_and_a_missing_gpu_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    assert gpu_check.main(["--cpu", "--parts", "glow-fp64"]) == 2
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "expected a CUDA GPU, got none; pass --cpu" in capsys.readouterr().err


def test_the_cpu_figure_comes_from_the_readme() -> None:
    figure, stderr = gpu_check.readme_cpu_figure()
    assert 1.0 < figure < 4.0 and 0 < stderr < 0.1
