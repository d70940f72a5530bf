"""Tests of models/training/resume.py: what a resumed run may change, and its refusals."""

from __future__ import annotations

import math

import pytest
import torch

from models.training import apply_schedule, build_optimizer, build_scheduler, changed_settings, check_resume
from models.training import check_resume_flags, make_scaler
from models.training.state import TrainState

FINGERPRINT = {"name": "digits", "train": 1497, "test": 300, "shape": [1, 8, 8], "num_levels": 17,
               "num_classes": 10, "sha256": "0123456789abcdef"}


def payload(**changes):
    return {"step": 100, "data": dict(FINGERPRINT), "world_size": 1, "rng": [{}], **changes}


def test_fixed_flags_are_refused_when_different_and_others_pass() -> None:
    saved = {"model": "glow", "seed": 0, "batch_size": 128, "lr": 1e-3, "dataset": "a/x.npy"}
    check_resume_flags({"model": "glow", "lr": 5e-4, "steps": 9}, saved, "c.pt")
    check_resume_flags({"dataset": "b/x.npy"}, saved, "c.pt")  # a moved file: its fingerprint decides
    with pytest.raises(ValueError, match=r"--batch-size 64 differs from the checkpoint's 128 \(c.pt\): a resumed run "
                                         r"keeps its model, data and batches .*leave out --batch-size"):
        check_resume_flags({"batch_size": 64}, saved, "c.pt")
    with pytest.raises(ValueError, match=r"--dataset two_moons differs from the checkpoint's a/x.npy"):
        check_resume_flags({"dataset": "two_moons"}, saved, "c.pt")


def test_other_data_of_the_same_shape_is_refused() -> None:
    check_resume(payload(), "c.pt", fingerprint=FINGERPRINT, steps=200, world_size=1)
    other = {**FINGERPRINT, "sha256": "fedcba9876543210"}
    with pytest.raises(ValueError, match=r"resume expected the data set the checkpoint was trained on, got other data "
                                         r"\(the same sizes and shape, other values\) \(sha256: 0123.* in the "
                                         r"checkpoint, fedc.* now\) for c.pt"):
        check_resume(payload(), "c.pt", fingerprint=other, steps=200, world_size=1)
    with pytest.raises(ValueError, match=r"got other data \(test: 300 in the checkpoint, 299 now"):
        check_resume(payload(), "c.pt", fingerprint={**FINGERPRINT, "test": 299}, steps=200, world_size=1)
    check_resume(payload(data=None), "c.pt", fingerprint=other, steps=200, world_size=1)  # no fingerprint kept


def test_another_process_count_is_refused_unless_allowed() -> None:
    with pytest.raises(ValueError, match=r"resume expected the checkpoint's process count \(2\), got 1 for c.pt: the "
                                         r"global batch would change .*--allow-new-world-size"):
        check_resume(payload(world_size=2), "c.pt", fingerprint=FINGERPRINT, steps=200, world_size=1)
    check_resume(payload(world_size=2), "c.pt", fingerprint=FINGERPRINT, steps=200, world_size=1,
                 allow_new_world_size=True)
    legacy = payload(rng=[{}, {}])
    del legacy["world_size"]  # older checkpoints: one RNG state per rank
    with pytest.raises(ValueError, match=r"process count \(2\), got 4"):
        check_resume(legacy, "c.pt", fingerprint=FINGERPRINT, steps=200, world_size=4)


def test_steps_below_the_checkpoints_step_are_refused() -> None:
    with pytest.raises(ValueError, match=r"--steps 50 is below the checkpoint's step 100 \(c.pt\): .*above 100"):
        check_resume(payload(), "c.pt", fingerprint=FINGERPRINT, steps=50, world_size=1)
    check_resume(payload(), "c.pt", fingerprint=FINGERPRINT, steps=100, world_size=1)
    check_resume(payload(), "c.pt", fingerprint=FINGERPRINT, steps=50, world_size=1, eval_only=True)


def state_at(step: int, lr: float, warmup: int = 10, total: int = 100, schedule: str = "cosine") -> TrainState:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, lr)
    scheduler = build_scheduler(optimizer, warmup, total, schedule)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return TrainState(model, optimizer, scheduler, make_scaler("none", torch.device("cpu")), {})


def test_apply_schedule_sets_a_new_learning_rate_from_the_current_step() -> None:
    state = state_at(30, 1e-3)
    before = state.optimizer.param_groups[0]["lr"]
    apply_schedule(state, 1e-3)  # the checkpoint's own settings: exactly the same rate
    assert state.optimizer.param_groups[0]["lr"] == before and state.scheduler.get_last_lr() == [before]
    apply_schedule(state, 5e-4)
    factor = 0.5 * (1 + math.cos(math.pi * 20 / 90))
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * factor, rel=1e-12)
    assert state.scheduler.base_lrs == [5e-4] and state.scheduler.get_last_lr()[0] == pytest.approx(5e-4 * factor)
    state.scheduler.step()  # the schedule goes on from the new base rate
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * 21 / 90)))


def test_changed_settings_lists_what_differs() -> None:
    assert changed_settings({"lr": 1e-3, "steps": 10, "out": "a"}, {"lr": 1e-3, "steps": 20, "out": "b"}, {"out"}) \
        == {"steps": [10, 20]}
