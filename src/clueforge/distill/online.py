"""Online distillation (ERNIE 3.0 Titan): students that learn while the teacher pretrains.

Declared in a pretraining config::

    train:
      students:
        pico: {student: pico, relation_weight: 1.0, soft_weight: 1.0}
        nano: {student: nano, init: random}

    clueforge pretrain --config mini --data runs/corpus --out runs/mini   # also writes runs/mini/students/*/final

Each micro-step, after the teacher's forward and backward, every student runs forward/backward on
the same batch against the teacher's already computed outputs — its MLM logits at the masked
positions, its last hidden states and the fused Q/K/V output of the relation layer, all detached:
no gradient reaches the teacher and the teacher runs no second forward. After the teacher's
optimizer step each student takes its own (same schedule and optimizer settings). The students
draw dropout from their own RNG state (saved in checkpoints), so the teacher's updates are exactly
those of the same run without students.

Auxiliary layer distillation: with ``aux_layer`` (the default) a student carries one extra block
on top while it learns (the distillation losses read that top block); it is dropped when the
student is exported to ``OUT/students/NAME/final`` (HF layout, what ``finetune`` takes).
Metrics: ``student_NAME_<loss>`` per log line; held-out scores ``student_NAME_eval_*`` of the
exported form (no auxiliary layer) and ``student_NAME_aux_eval_*`` of the form that learns.
One process only (students are not data-parallel).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clueforge.distill import DistillConfig
from clueforge.distill.agnostic import (QKVTap, TeacherOutput, distill_loss, hidden_projection, relation_heads,
                                        relation_layer)
from clueforge.distill.student import build_student, drop_aux_layer, with_aux_layer
from clueforge.model.bert import BertForMLM
from clueforge.model.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from clueforge.utils import UserError, sha256_file

log = logging.getLogger("clueforge.distill")


class Student(nn.Module):
    """One online student: ``mlm`` (with its auxiliary layer while it learns) and ``aux`` (the
    hidden-state projection, or None)."""

    def __init__(self, mlm: BertForMLM, proj: nn.Module | None):
        super().__init__()
        self.mlm = mlm
        self.aux = nn.ModuleDict({"hidden_proj": proj}) if proj is not None else None


class OnlineStudents:
    """The students of one pretraining run and what they need of the teacher (``follow``/``step``
    are the loop's two calls per micro-step/optimizer step)."""

    def __init__(self, cfg, teacher: BertForMLM, device: torch.device, world: int, resume: Path | None = None):
        from clueforge.pretrain.config import build_dataclass
        from clueforge.pretrain.loop import lr_lambda, param_groups

        t = cfg.train
        if world > 1:
            raise UserError("train.students: online distillation runs in one process (students are not "
                            "data-parallel); launch without torchrun, or drop train.students")
        if t.compile:
            raise UserError("train.students: not with train.compile (the students read the teacher through hooks)")
        self.t, self.device = t, device
        self.cuda = [device.index or 0] if device.type == "cuda" else []
        self.members: dict[str, dict] = {}
        self.taps: dict[int, QKVTap] = {}
        with torch.random.fork_rng(devices=self.cuda):  # building students never moves the teacher's RNG
            for i, name in enumerate(sorted(t.students)):
                d = build_dataclass(DistillConfig, dict(t.students[name]), f"train.students.{name}")
                torch.manual_seed(t.seed + 7919 * (i + 1))
                mlm = build_student(d.student, teacher, d.init, d.embeddings, narrow=d.narrow_layers)
                if d.aux_layer:
                    mlm = with_aux_layer(mlm)
                model = Student(mlm, hidden_projection(d, mlm.cfg, teacher.cfg)).to(device).train()
                layer = relation_layer(d.relation_layer, teacher.cfg.num_layers)
                if d.relation_weight and layer not in self.taps:
                    self.taps[layer] = QKVTap(teacher.encoder.layers[layer - 1], only_training=True)
                opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=t.eps)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(cfg, s))
                torch.manual_seed(t.seed + 7919 * (i + 1) + 1)  # the student's dropout stream
                rng = self._rng_now()
                self.members[name] = {"d": d, "model": model, "opt": opt, "sched": sched, "layer": layer, "rng": rng,
                                      "heads": relation_heads(d, mlm.cfg, teacher.cfg), "parts": {}, "steps": 0}
        if resume is not None:
            self.load(resume)

    @contextmanager
    def _own_rng(self, m: dict):
        """Run with the student's RNG state; the caller's (the teacher's) is restored after."""
        with torch.random.fork_rng(devices=self.cuda):
            torch.set_rng_state(m["rng"]["cpu"])
            if self.cuda:
                torch.cuda.set_rng_state(m["rng"]["cuda"], self.cuda[0])
            yield
            m["rng"] = self._rng_now()

    def _rng_now(self) -> dict:
        return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(self.cuda[0])} if self.cuda else {})}

    def follow(self, batch: dict, teacher_out, grad_accum: int, autocast) -> None:
        """After the teacher's forward/backward on ``batch``: each student's forward/backward on the
        same batch, against ``teacher_out`` (a ``PretrainOutput``) and the tapped Q/K/V."""
        qkv = {layer: tap.take() for layer, tap in self.taps.items()}
        main = {k: v for k, v in batch.items() if k != "aux"}
        for m in self.members.values():
            d = m["d"]
            tout = TeacherOutput(teacher_out.logits.detach() if d.soft_weight else None,
                                 teacher_out.hidden.detach() if d.hidden_weight else None,
                                 qkv[m["layer"]].detach() if d.relation_weight else None)
            model = m["model"]
            with self._own_rng(m), autocast():
                proj = model.aux["hidden_proj"] if model.aux is not None else None
                loss, _, parts = distill_loss(model.mlm, proj, main, tout, d, m["heads"])
                (loss / grad_accum).backward()
            for k, v in parts.items():
                m["parts"][k] = m["parts"].get(k, 0.0) + v.float().item() / grad_accum

    def step(self) -> None:
        """Each student's optimizer step (after the teacher's)."""
        for m in self.members.values():
            if self.t.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(m["model"].parameters(), self.t.clip_grad)
            m["opt"].step()
            m["sched"].step()
            m["opt"].zero_grad(set_to_none=True)
            m["steps"] += 1

    def log(self, evaluate=None) -> dict:
        """Each student's mean losses since the last call; with ``evaluate`` (the loop's held-out
        scorer of a ``BertForMLM``) also its held-out scores, exported and as it learns."""
        rec = {}
        for name, m in self.members.items():
            rec.update({f"student_{name}_{k}": v / max(1, m["steps"]) for k, v in sorted(m["parts"].items())})
            m["parts"], m["steps"] = {}, 0
            if evaluate is not None:
                with self._own_rng(m):
                    exported = self.exported(m).to(self.device)
                    rec.update({f"student_{name}_{k}": v for k, v in evaluate(exported).items()})
                    if m["d"].aux_layer:
                        rec.update({f"student_{name}_aux_{k}": v for k, v in evaluate(m["model"].mlm).items()})
        return rec

    @staticmethod
    def exported(m: dict) -> BertForMLM:
        mlm = m["model"].mlm
        return drop_aux_layer(mlm) if m["d"].aux_layer else mlm

    # -----------------------------------------------------------------------------------------
    # Checkpoints: ``step-N/students/NAME/`` beside the teacher's files

    def save(self, ckpt_dir: Path) -> None:
        from clueforge.pretrain.checkpoint import optimizer_tensors

        for name, m in self.members.items():
            d = ckpt_dir / "students" / name
            d.mkdir(parents=True, exist_ok=True)
            model = m["model"]
            save_file(to_hf_state_dict(model.mlm), d / "model.safetensors", metadata={"format": "pt"})
            (d / "config.json").write_text(json.dumps(hf_config(model.mlm.cfg), indent=2))
            files = ["model.safetensors", "config.json", "optimizer.safetensors", "rng.safetensors"]
            if model.aux is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in model.aux.state_dict().items()},
                          d / "aux.safetensors")
                files.append("aux.safetensors")
            opt_t, opt_meta = optimizer_tensors(m["opt"])
            save_file(opt_t, d / "optimizer.safetensors")
            save_file({k: v.contiguous() for k, v in m["rng"].items()}, d / "rng.safetensors")
            state = {"optimizer": opt_meta, "scheduler": m["sched"].state_dict(), "parts": m["parts"],
                     "steps": m["steps"], "sha256": {f: sha256_file(d / f) for f in files}}
            (d / "state.json").write_text(json.dumps(state, indent=1))

    def load(self, ckpt_dir: Path) -> None:
        from clueforge.pretrain.checkpoint import load_optimizer
        from clueforge.pretrain.loop import _apply_optimizer_settings

        for name, m in self.members.items():
            d = ckpt_dir / "students" / name
            if not (d / "state.json").is_file():
                log.warning("checkpoint %s has no student %s: it starts fresh at this step", ckpt_dir, name)
                continue
            state = json.loads((d / "state.json").read_text())
            for f, digest in state["sha256"].items():
                if sha256_file(d / f) != digest:
                    raise UserError(f"{d / f}: sha256 mismatch (a damaged checkpoint); resume from an earlier one")
            model = m["model"]
            from_hf_state_dict(model.mlm, load_file(d / "model.safetensors"), strict_head=True)
            if model.aux is not None:
                model.aux.load_state_dict(load_file(d / "aux.safetensors"))
            load_optimizer(m["opt"], load_file(d / "optimizer.safetensors"), state["optimizer"])
            m["sched"].load_state_dict(state["scheduler"])
            _apply_optimizer_settings(m["opt"], m["sched"], self.t)
            m["rng"] = dict(load_file(d / "rng.safetensors"))
            m["parts"], m["steps"] = state["parts"], state["steps"]

    def export(self, root: Path, vocab: Path) -> dict[str, str]:
        """``root/NAME/final`` for every student, in the HF layout, without the auxiliary layer."""
        from clueforge.model.hf import save_hf

        out = {}
        for name, m in self.members.items():
            with self._own_rng(m):
                out[name] = str(save_hf(self.exported(m), root / name / "final", vocab=vocab))
        return out
