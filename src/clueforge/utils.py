"""Small helpers shared across stages: hashing, atomic writes, the user-error type."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


class UserError(ValueError):
    """A mistake the user can fix (a bad setting, file or argument): the CLI prints its message on
    one line and exits 2; anything else is a bug and keeps its traceback."""


@dataclass(frozen=True)
class Rule:
    """A number in ``[lo, hi]`` (open ends where ``lo_open``/``hi_open``), or one of ``choices``.
    ``None`` is allowed where the field's type allows it (checked by ``_coerce``)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()

    def ok(self, v) -> bool:
        if self.choices:
            return isinstance(v, str) and v in self.choices
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:  # bool, non-number, NaN
            return False
        if isinstance(v, float) and v in (float("inf"), float("-inf")):  # .inf trains NaN
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '≥'} {self.lo:g}"
        return f"{'<' if self.hi_open else '≤'} {self.hi:g}"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary name, fsync, rename: a crash leaves the old file or the new.
    On failure the temporary file is removed."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where the
    platform or file system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move the complete directory ``tmp`` to ``final``, replacing an old one so that a crash at any
    moment leaves the old or the new, never neither, and never a mix: the two are swapped
    atomically where the system can (Linux), else the old is renamed aside, the new renamed in and
    the old removed (``recover_dir`` puts an aside copy back after a crash between the renames)."""
    tmp, final = Path(tmp), Path(final)
    recover_dir(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):  # tmp now holds the old directory
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = final.with_name(final.name + f".old{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside)
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(final: str | Path) -> None:
    """After a crash inside ``replace_dir``: if ``final`` is missing but an ``.old*`` copy exists,
    put the old one back; stale ``.old*`` copies beside a present ``final`` are removed."""
    final = Path(final)
    olds = sorted(final.parent.glob(final.name + ".old*")) if final.parent.is_dir() else []
    for old in olds:
        if not final.exists():
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
