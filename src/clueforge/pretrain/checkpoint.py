"""Training checkpoints: safetensors + JSON, written atomically, verified on load.

``checkpoints/step-N/`` holds::

    model.safetensors, config.json   the model in the HF layout (the directory loads as a model)
    optimizer.safetensors            AdamW moments per parameter index
    rng-rank{r}.safetensors          each rank's torch RNG states (CPU and CUDA)
    trainer_state.json               step, tokens, scheduler, scaler, optimizer hyper-parameters,
                                     python RNG, and the sha256 of every file above

The directory is assembled as ``step-N.tmp`` and renamed when complete, so a kill at any moment
leaves either the whole checkpoint or none. A checkpoint whose hashes do not match is skipped
with a warning and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clueforge.model.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from clueforge.pretrain.model import PretrainingModel
from clueforge.utils import replace_dir, sha256_file

log = logging.getLogger("clueforge.pretrain")
_STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{pid}.{k}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def clean_partial(root: Path) -> None:
    """Remove half-written ``*.tmp*`` directories left by a killed run."""
    if root.is_dir():
        for p in root.iterdir():
            if ".tmp" in p.name:
                shutil.rmtree(p, ignore_errors=True)


def write_rank_rng(tmp: Path, rank: int) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(rng_tensors(), tmp / f"rng-rank{rank}.safetensors")


def tmp_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}.tmp"


def save_checkpoint(root: Path, step: int, model: PretrainingModel, opt: torch.optim.Optimizer, state: dict,
                    world: int, keep: int) -> Path:
    """Called on rank 0 after every rank wrote its RNG into ``tmp_dir(root, step)``."""
    tmp = tmp_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model.mlm), tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(model.mlm.cfg), indent=2))
    opt_t, opt_meta = optimizer_tensors(opt)
    save_file(opt_t, tmp / "optimizer.safetensors")
    files = ["model.safetensors", "config.json", "optimizer.safetensors"] + [f"rng-rank{r}.safetensors" for r in range(world)]
    if model.aux is not None:  # pretraining-only heads: not part of the HF layout
        save_file({k: v.detach().contiguous().cpu() for k, v in model.aux.state_dict().items()},
                  tmp / "aux.safetensors")
        files.append("aux.safetensors")
    state = {**state, "step": step, "world_size": world, "optimizer": opt_meta, "python_rng": _py_rng(),
             "sha256": {f: sha256_file(tmp / f) for f in files}}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    final = root / f"step-{step}"
    replace_dir(tmp, final)  # never deletes an existing step-N before the new one is in place
    for _, old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _py_rng() -> list:
    v, internal, gauss = random.getstate()
    return [v, list(internal), gauss]


def verify(path: Path) -> dict:
    state = json.loads((path / "trainer_state.json").read_text())
    for f, digest in state["sha256"].items():
        if sha256_file(path / f) != digest:
            raise ValueError(f"{path / f}: sha256 mismatch")
    return state


def latest_valid(root: Path) -> tuple[Path, dict] | None:
    """Newest checkpoint that verifies; corrupt ones are reported and skipped."""
    found = list(reversed(list_checkpoints(root)))
    for i, (step, path) in enumerate(found):
        try:
            return path, verify(path)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            if i + 1 < len(found):
                log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, exc)
            else:
                log.warning("checkpoint %s is unusable (%s) and there is no earlier one: training restarts "
                            "from step 0", path, exc)
    return None


def load_checkpoint(path: Path, state: dict, model: PretrainingModel, opt: torch.optim.Optimizer, rank: int) -> None:
    from_hf_state_dict(model.mlm, load_file(path / "model.safetensors"), strict_head=True)
    if model.aux is not None:
        if not (path / "aux.safetensors").is_file():
            raise ValueError(f"{path}: the config has structure objectives but the checkpoint has no aux.safetensors")
        model.aux.load_state_dict(load_file(path / "aux.safetensors"))
    load_optimizer(opt, load_file(path / "optimizer.safetensors"), state["optimizer"])
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        restore_rng(load_file(rng_file))
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
