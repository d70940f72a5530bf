"""The package as a user gets it: a wheel installs `flows` and `jacflow.models`, never a
top-level `models`, and every ready model and the embedded data set work from it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run outside the repository, with only the installed wheel (and the venv's torch) on the path.
USE = """
import importlib.util, inspect, jacflow.models as m
from jacflow.models.data import load_dataset
assert importlib.util.find_spec("models") is None, "a top-level `models` was installed"
for name, cls in m.MODELS.items():
    for preset in cls.PRESETS:
        shape = (2,) if preset in {"toy2d", "small", "power", "gas", "hepmass", "miniboone", "bsds300"} else (1, 8, 8)
        levels = None if len(shape) == 1 else 17
        sizes = dict(hidden_features=4, num_steps=1)
        if "num_scales" in inspect.signature(cls).parameters:
            sizes["num_scales"] = 2  # 8x8 images allow two squeezes
        model = m.build_model(name, preset, shape, levels, **sizes)
        assert model.sample(2).shape == (2, *shape), (name, preset)
digits = load_dataset("digits", split="test")
print("ok", len(m.MODELS), tuple(digits.data.shape))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    return next(out.glob("jacflow-*.whl"))


def test_the_wheel_holds_flows_and_jacflow_models_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"flows", "jacflow", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    assert "jacflow/models/assets/digits.npz" in names and "flows/py.typed" in names


def test_every_model_and_the_digits_build_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    torch_dir = Path(__import__("torch").__file__).parents[1]  # the venv's site-packages, for torch and numpy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(torch_dir)]), "PYTHONNOUSERSITE": "1"}
    result = subprocess.run([sys.executable, "-S", "-c", USE], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    import models

    assert result.stdout.split() == ["ok", str(len(models.MODELS)), "(300,", "1,", "8,", "8)"]
