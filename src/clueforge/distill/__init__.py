"""Distillation into lightweight students (issue 12).

- ``losses``: MiniLMv2 Q-Q/K-K/V-V relation KL, TinyBERT hidden MSE through a projection, soft MLM
  KL with temperature (plain tensor functions).
- ``student``: a student's shape (``configs/students/{mini,micro,nano,pico}.yaml``, a YAML file or
  a model directory) and its first weights from the teacher (every k-th layer, a chosen list, or
  random; embeddings sliced or projected when the widths differ); the auxiliary layer.
- ``agnostic``: task-agnostic distillation on the pretraining shards, through the pretraining loop
  (``clueforge distill --teacher DIR --student pico --data CORPUS --out DIR``).
- ``online``: ERNIE 3.0 Titan online distillation: students declared in ``train.students`` of a
  ``clueforge pretrain`` config take a step after every teacher step, on the teacher's outputs.
- ``task`` (another module): task distillation, ``clueforge distill --task TASK ...``, called as::

      clueforge.distill.task.distill_task(task: str, teacher: Path, student: str | Path, data: Path,
                                          out: Path, overrides: list[str], *, seed: int | None = None,
                                          show_progress: bool = True) -> dict

  ``teacher`` a fine-tuned task directory, ``student`` as ``student.build_student`` takes it,
  ``data`` the task's folder, ``overrides`` the ``--set`` items; returns a JSON-able summary (the
  CLI prints it as one line). The caller holds ``run_lock(out)`` and turns ``UserError`` into exit 2.

``DistillConfig`` holds the settings of one student: the ``distill`` section of a ``clueforge
distill`` run and each entry of ``train.students`` in a pretraining config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass
class DistillConfig:
    student: str = "pico"
    """A shipped student (mini, micro, nano, pico: ``configs/students``), a YAML file with a
    ``model`` section, or a model directory (which then gives the first weights)."""
    init: Union[str, list] = "teacher"  # Union: the config reader coerces ``str | …``/``list | …`` to one type
    """``teacher`` (every k-th teacher layer, the top one included: DistilBERT), a list of 1-based
    teacher layers, or ``random``."""
    embeddings: str = "slice"
    """When the widths differ: ``slice`` (the teacher's first dimensions) or ``project`` (its top
    principal directions)."""
    narrow_layers: str = "random"
    """When the student's blocks are narrower than the teacher's (width, heads, head width or
    feed-forward): ``slice`` cuts each chosen teacher layer down to the student's shape (the first
    residual dimensions, heads, head dimensions and feed-forward units), ``magnitude`` likewise
    but keeps the heads and feed-forward units of largest weight norm, ``random`` leaves the layers
    random (only the embeddings and the MLM head's bias come from the teacher)."""
    relation_weight: float = 1.0
    """Weight of the MiniLMv2 Q-Q/K-K/V-V relation KL (student's top layer vs ``relation_layer``)."""
    relation_layer: float = -1
    """Teacher layer of the relations: 1-based (``8``), from the top (``-1``: the last), or a
    fraction of the depth (``0.75``: upper-middle)."""
    relation_heads: int = 0
    """Heads the relations are split into on both sides (0: the student's head count); must
    divide both widths."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state MSE (student's top layer through a learned projection vs the
    teacher's last layer)."""
    soft_weight: float = 1.0
    """Weight of the MLM soft-target KL (teacher ‖ student) at masked positions."""
    temperature: float = 1.0
    """Temperature of the soft targets (the KL is scaled by T²)."""
    mlm_weight: float = 1.0
    """Weight of the hard MLM loss."""
    aux_layer: bool = True
    """Online students only: carry one extra layer during distillation, dropped at export (ERNIE
    3.0 Titan's auxiliary layer distillation)."""
