"""One process per run directory: an exclusive lock that every writing stage takes.

``pretrain``, ``finetune`` and ``corpus build`` (and any later stage that writes a run directory)
wrap their work in ``run_lock(out)``. The lock is ``fcntl.flock`` on ``OUT/.lock``: the kernel
releases it when the holder exits, however it exits (kill -9 included), so a lock left by a dead
process is never in the way; the holder writes its pid and stage into the file so that a refused
second process can say who holds the directory.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from clueforge.utils import UserError

LOCK_NAME = ".lock"


class RunLocked(UserError):
    """Another live process holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(directory: str | Path, what: str = "run"):
    """Hold an exclusive lock on ``directory`` (created if needed) for the ``with`` block.

    Raises ``RunLocked`` naming the holder's pid when another process holds it. A lock file left
    by a process that died is taken over (the kernel dropped its lock) and logged as stale.
    Only the main process of a multi-process launch (``RANK`` 0) locks: the others share its run.
    """
    if os.environ.get("RANK", "0") != "0":
        yield None
        return
    directory = Path(os.path.abspath(directory))  # "a/../b": the directories it names, not a path through a
    created = None  # the outermost directory this call creates (None: ``directory`` was there)
    for d in (directory, *directory.parents):
        if d.exists():
            break
        created = d
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, stage = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
            raise RunLocked(f"{directory} is in use by {stage or 'another process'} (pid {pid or 'unknown'}); "
                            f"this {what} cannot use it: wait for it to finish or stop it, or use another "
                            f"--out") from None
        previous = os.pread(fd, 256, 0).decode(errors="replace").strip().split(" ")[0]
        if previous.isdigit() and int(previous) != os.getpid() and not _pid_alive(int(previous)):
            import logging

            logging.getLogger("clueforge").info("%s: stale lock of dead process %s taken over", path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)  # pid, then the stage, for a refused process
        try:
            yield path
        except BaseException:
            # a stage refused before writing anything leaves no directory behind that it created
            try:
                if created is not None and [p.name for p in directory.iterdir()] == [LOCK_NAME]:
                    path.unlink()
                    for d in (directory, *directory.parents):
                        d.rmdir()  # only an empty one: a sibling --out created meanwhile stays
                        if d == created:
                            break
            except OSError:  # best effort: the stage's own error is what the user must see
                pass
            raise
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Resuming with changed settings.

# Settings that only change when to log, evaluate, save or stop (or how fast), never what a step
# computes: a resume may change them. ``max_steps`` also stretches the learning-rate schedule from
# the resumed step on; that is what a user asking for more steps means.
PRETRAIN_MUTABLE = frozenset({
    "train.max_steps", "train.save_every", "train.eval_every", "train.log_every", "train.eval_batches",
    "train.keep_checkpoints", "train.prefetch", "train.peak_tflops", "train.compile", "train.gradient_checkpointing",
    "train.threads", "train.budget_recheck",
})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "train") and not prefix:
            out.update(_flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(saved: dict, new: dict, defaults: dict | None = None) -> dict[str, tuple]:
    """``key → (saved, new)`` for every setting that differs (compared as JSON values). A setting
    the saved config lacks (a run written before the field existed) counts as its value in
    ``defaults``: new fields default to the old behaviour."""
    import json

    a = _flatten(json.loads(json.dumps(defaults or {})))
    a.update(_flatten(json.loads(json.dumps(saved))))
    b = _flatten(json.loads(json.dumps(new)))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_config(saved: dict, new: dict, *, allow: bool, mutable=PRETRAIN_MUTABLE,
                        at_step: int = 0, defaults: dict | None = None) -> dict | None:
    """Compare a resumed run's saved config with the new one.

    Returns ``None`` when nothing changed, else a history record ``{step, changes, allowed_by}`` of
    the changes to apply. Raises ``UserError`` listing the differences when some are outside
    ``mutable`` and ``allow`` (``--allow-config-change``) is not given.
    """
    changes = config_changes(saved, new, defaults)
    if not changes:
        return None
    fixed = {k: v for k, v in changes.items() if k not in mutable}
    if fixed and not allow:
        listed = "; ".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in fixed.items())
        raise UserError(f"this run was trained with other settings ({listed}); resuming would mix them. Rerun "
                        f"with the run's settings, use another --out, or pass --allow-config-change to apply "
                        f"and record the change")
    return {"step": at_step, "changes": {k: {"from": o, "to": n} for k, (o, n) in changes.items()},
            "allowed_by": "--allow-config-change" if fixed else "resume (settings that may change)"}
