"""Which mode a configuration trains in, without torch.

The cloud and local tuners run where torch may be absent, yet must search what the job will
train: ``TrainConfig`` takes its defaults for these fields and its ``mode_of`` from here, so
the tuner and the training program resolve the mode by one rule (each arch's from the
torch-free family table, :mod:`flystage.training.families`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flystage.options import parse_bool
from flystage.training.families import archs, family_of

MODES: tuple[str, ...] = ("auto", "full", "probe", "finetune")
PROBE_SOLVERS: tuple[str, ...] = ("lbfgs", "sgd")
# TrainConfig's defaults of the fields that decide the mode.
DEFAULT_ARCH = "efficientnet_lite2"
DEFAULT_MODE = "auto"
DEFAULT_PROBE_SOLVER = "lbfgs"

EXACT_PROBE = "exact probe"  # the head solved in closed form: deterministic, no epochs
GRADIENT = "gradient"  # trained by the epoch loop: learning rate and batch size matter


def mode_of(mode: str, arch: str, pretrained: bool) -> str:
    """The training mode of ``arch``: ``mode`` unless it is ``auto``, which is the family's
    (:mod:`flystage.training.families`: it probes the EfficientNet-Lites and pretrained
    torchvision archs and trains the rest in full); an unknown arch: full."""
    if mode != "auto":
        return mode
    return family_of(arch).auto(pretrained) if arch in archs() else "full"


def _archs(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(a) for a in value)
    return tuple(a.strip().strip("\"'[] ") for a in str(value).split(",") if a.strip("\"'[] "))


def training_kind(hyperparameters: Mapping[str, Any]) -> str:
    """``EXACT_PROBE`` when every member of the model these hyperparameters train is a probe
    whose head is solved exactly (``probe_solver=lbfgs``), else ``GRADIENT``; the defaults are
    TrainConfig's. Values may be SageMaker's strings (``"true"``, ``"resnet18"``)."""
    arch = str(hyperparameters.get("arch", DEFAULT_ARCH)).strip("\"'")
    members = _archs(hyperparameters.get("ensemble_archs", "")) or (arch,)
    mode = str(hyperparameters.get("mode", DEFAULT_MODE)).strip("\"'")
    pretrained = parse_bool(hyperparameters.get("pretrained", False))
    solver = str(hyperparameters.get("probe_solver", DEFAULT_PROBE_SOLVER)).strip("\"'")
    probes = all(mode_of(mode, a, pretrained) == "probe" for a in members)
    return EXACT_PROBE if probes and solver == "lbfgs" else GRADIENT
