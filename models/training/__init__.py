"""The training kit behind ``train.py``: processes, batches, the step, the loop, evaluation,
checkpoints, the metrics log and pictures, what free-form log-dets mean for a run, what a
run monitors besides the loss, memory-saving backpropagation and the flags, one idea per module.

Conventions: the loss is the negative log-likelihood in nats per dimension, averaged over
the batch; image data arrive in level units and are dequantized by the batches
(``x + u``), so bits/dim is ``loss / ln 2``; only rank 0 writes files or prints.
"""

from __future__ import annotations

# Processes and devices
from .processes import Processes, resolve_device, setup_processes, teardown_processes

# Batches
from .batches import Batch, EpochBatches, augmented, check_finite, make_train_loader, train_batches

# Optimization
from .optimization import autocast, build_optimizer, build_scheduler, lr_factor, make_scaler

# The step
from .step import LogProbParts, StepOutput, apply_update, needs_data_init, prepare_model, train_step

# What the numbers of free-form models are; what else a run watches; memory flat in depth
from .freeform import EXACT_MAX_DIMS, evaluation_logdet, loss_kind, loss_note, set_logdet_mode
from .monitors import Drift, FunctionEvaluations, Monitor, Penalty, configure_continuous, monitors_for, rnode_penalty
from .invertible import use_invertible_backprop

# Stopping early: non-finite values and signals
from .stopping import NonFiniteWatch, StopSignals

# The run: its data, state, folder, loop and evaluation
from .inputs import check_nonempty, data_fingerprint, load_splits
from .state import RunDir, TrainState
from .run_dir import RunLock, claim_run_dir, start_run_files
from .evaluation import EvalResult, evaluate, evaluating, kl_gap
from .loop import LOSS_KINDS, LoopSettings, fit

# Resuming: what may change, and the checks that a run continues the same run
from .resume import FIXED_ON_RESUME, apply_schedule, changed_settings, check_resume, check_resume_flags

# Files of a run
from .files import RunFileError, append_text, atomic_write, writing
from .checkpoints import check_compatible, checkpoint_payload, load_checkpoint, restore, save_checkpoint
from .metrics_log import MetricsLog, read_metrics
from .plots import save_class_densities, save_density, save_loss_curve, save_run_pictures, save_samples

# Host memory
from .allocator import reuse_freed_memory

# Command-line flags from a config dataclass
from .flags import build_parser, option

__all__ = [
    "Processes", "resolve_device", "setup_processes", "teardown_processes",
    "Batch", "EpochBatches", "augmented", "check_finite", "make_train_loader", "train_batches",
    "autocast", "build_optimizer", "build_scheduler", "lr_factor", "make_scaler",
    "LogProbParts", "StepOutput", "apply_update", "needs_data_init", "prepare_model", "train_step",
    "EXACT_MAX_DIMS", "evaluation_logdet", "loss_kind", "loss_note", "set_logdet_mode",
    "Drift", "FunctionEvaluations", "Monitor", "Penalty", "configure_continuous", "monitors_for", "rnode_penalty",
    "use_invertible_backprop",
    "NonFiniteWatch", "StopSignals",
    "check_nonempty", "data_fingerprint", "load_splits", "RunDir", "TrainState", "RunLock", "claim_run_dir",
    "start_run_files", "EvalResult", "evaluate", "evaluating", "kl_gap", "LOSS_KINDS", "LoopSettings", "fit",
    "FIXED_ON_RESUME", "apply_schedule", "changed_settings", "check_resume", "check_resume_flags",
    "RunFileError", "append_text", "atomic_write", "writing",
    "check_compatible", "checkpoint_payload", "load_checkpoint", "restore", "save_checkpoint",
    "MetricsLog", "read_metrics", "save_class_densities", "save_density", "save_loss_curve", "save_run_pictures",
    "save_samples",
    "reuse_freed_memory",
    "build_parser", "option",
]
