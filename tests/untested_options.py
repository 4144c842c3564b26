"""List the ``TrainConfig`` / ``FinetuneConfig`` / ``ModelConfig`` fields that no test file names.

    python tests/untested_options.py        # exit status 1 when some are listed

A name in a test is necessary, not sufficient: the test must also fail when the option does
nothing. This only finds the options nobody has tried.
"""

from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from clueforge.finetune.loop import FinetuneConfig  # noqa: E402
from clueforge.model.bert import ModelConfig  # noqa: E402
from clueforge.pretrain.config import TrainConfig  # noqa: E402


def untested() -> dict[str, list[str]]:
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(HERE.glob("test_*.py")))
    out = {}
    for cls in (TrainConfig, FinetuneConfig, ModelConfig):
        missing = [f.name for f in fields(cls) if not re.search(rf"\b{re.escape(f.name)}\b", text)]
        if missing:
            out[cls.__name__] = missing
    return out


if __name__ == "__main__":
    found = untested()
    for cls, names in found.items():
        print(f"{cls}: {', '.join(names)}")
    sys.exit(1 if found else 0)
