"""Validate leaderboard prediction files against the official test files, and zip them.

A wrong file name or id scores 0 on the leaderboard, so every problem is reported with the file,
the id (or line) and what is wrong, before anything is zipped.
"""

from __future__ import annotations

import importlib
import json
import zipfile
from pathlib import Path

from clueforge.tasks.io import TaskDataError
from clueforge.tasks.registry import TASKS, Task

# Where a task's files live under a data root: the official CLUE release names and this project's
# ../shared/data/tasks layout.
_FOLDERS = {"msra-ner": ["msra_ner", "msra"], "cluewsc2020": ["cluewsc2020", "cluewsc"], "c3": ["c3"],
            "cmrc2018": ["cmrc2018", "cmrc"], "kgclue": ["kgclue"]}


def task_dir(root: Path, task: Task) -> Path | None:
    """The folder of ``task`` under ``root`` (``root`` itself if it holds the task's files)."""
    root = Path(root)
    short = task.name.removeprefix("fewclue-")
    names = _FOLDERS.get(task.name, []) + [task.name, short, f"{short}_public"]
    candidates = [root] + [root / n for n in names]
    if task.name.startswith("fewclue-"):
        candidates = [root / "fewclue" / short, root / short] + candidates
    for c in candidates:
        files = task.files.get("test", "").split(",") + task.files.get("dev", "").split(",")
        if any((c / f).is_file() for f in files if f):
            return c
    return None


def _rows(path: Path, as_object: bool):
    """A JSON object (CMRC2018, CHID) or ``(line, object)`` per JSON line."""
    text = path.read_text(encoding="utf-8")
    if as_object:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TaskDataError(f"{path}: expected one JSON object {{id: prediction}}")
        return obj
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
    return rows


def validate_file(path: Path, task: Task, data_root: Path) -> list[str]:
    """Problems of one prediction file (empty when it is fine)."""
    fam = importlib.import_module(f"clueforge.tasks.{task.family}")
    folder = task_dir(data_root, task)
    if folder is None:
        return [f"{path.name}: no test data for {task.name} under {data_root}"]
    test_files = [folder / f for f in task.files["test"].split(",")]
    missing = [str(f) for f in test_files if not f.is_file()]
    if missing:
        return [f"{path.name}: test file {missing[0]} not found"]
    from clueforge.finetune.loop import prepare_state

    state = prepare_state(fam, task, folder) if task.family != "kgclue" else {"kb": None}
    examples = [e for f in test_files for e in fam.load(task, f, state, False)]
    expected = [e["id"] for e in examples]
    got = _rows(path, as_object=task.family == "span" or task.fmt == "chid_clue")
    problems: list[str] = []
    if isinstance(got, dict):  # CMRC2018 / CHID: {id: prediction}
        keys = set(got)
        for i in expected:
            if str(i) not in keys:
                problems.append(f"{path.name}: id {i}: no prediction")
        for k in keys - {str(i) for i in expected}:
            problems.append(f"{path.name}: id {k}: not in the test file")
        if task.family == "choice":
            choices = {str(e["id"]): len(e["choices"]) for e in examples}
            for k, v in got.items():
                if k in choices and not (isinstance(v, int) and 0 <= v < choices[k]):
                    problems.append(f"{path.name}: id {k}: answer {v!r} is not a candidate index")
        return problems
    seen: dict = {}
    by_id = {e["id"]: e for e in examples}
    labels = state.get("labels")
    for lineno, row in got:
        if not isinstance(row, dict) or "id" not in row:
            problems.append(f"{path.name}:{lineno}: no 'id'")
            continue
        i = row["id"]
        if i not in by_id:
            problems.append(f"{path.name}:{lineno}: id {i!r} is not in the test file")
            continue
        if i in seen:
            problems.append(f"{path.name}:{lineno}: id {i!r} predicted twice (first at line {seen[i]})")
        seen[i] = lineno
        key = "answer" if task.family == "kgclue" else ("label" if task.family == "ner" else task.label_field)
        if key not in row:
            problems.append(f"{path.name}:{lineno}: id {i!r}: no {key!r}")
            continue
        value = row[key]
        if task.family == "classify" and labels is not None and str(value) not in labels:
            problems.append(f"{path.name}:{lineno}: id {i!r}: label {value!r} is not in the label set")
        elif task.family == "choice" and not (isinstance(value, int) and 0 <= value < len(by_id[i]["choices"])):
            problems.append(f"{path.name}:{lineno}: id {i!r}: {key} {value!r} is not a choice index")
        elif task.family == "kgclue" and value and len(value.split("|||")) != 3:
            problems.append(f"{path.name}:{lineno}: id {i!r}: answer {value!r} is not 'head ||| relation ||| tail'")
        elif task.family == "ner" and not isinstance(value, dict):
            problems.append(f"{path.name}:{lineno}: id {i!r}: label must be {{type: {{entity: [[start, end]]}}}}")
    for i in expected:
        if i not in seen:
            problems.append(f"{path.name}: id {i!r}: no prediction")
    return problems


def validate_and_zip(pred_dir: Path, data_root: Path, out_zip: Path | None = None) -> tuple[Path, list[str]]:
    """Check every ``*_predict.json`` in ``pred_dir``; zip them when all are valid."""
    pred_dir = Path(pred_dir)
    by_file = {t.submission: t for t in TASKS.values()}
    files = sorted(p for p in pred_dir.iterdir() if p.name.endswith("_predict.json"))
    problems: list[str] = []
    if not files:
        problems.append(f"{pred_dir}: no *_predict.json files")
    for f in files:
        task = by_file.get(f.name)
        if task is None:
            problems.append(f"{f.name}: not a leaderboard file name (known: {', '.join(sorted(by_file))})")
            continue
        try:
            problems.extend(validate_file(f, task, data_root))
        except TaskDataError as exc:
            problems.append(str(exc))
    out_zip = Path(out_zip or pred_dir / "submission.zip")
    if not problems:
        tmp = out_zip.with_name(out_zip.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in files:
                info = zipfile.ZipInfo(f.name, date_time=(2020, 1, 1, 0, 0, 0))
                zf.writestr(info, f.read_bytes(), zipfile.ZIP_DEFLATED)
        tmp.replace(out_zip)
    return out_zip, problems
