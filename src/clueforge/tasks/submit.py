"""Validate leaderboard prediction files against the official test files, and zip them.

A wrong file name, id or line order scores 0 on the leaderboard, so every problem is reported with
the file, the line (or id) and what is wrong, before anything is zipped:

- names are the official ones (``registry.submission_names``); a near miss names the expected file;
- every id of the test file is predicted once, in the test file's order (CLUE scores JSON-lines
  files by line order, and the KgCLUE and CLUENER scorers zip the lines with the gold);
- each row's value is checked by its family (``check_prediction``: a label of the label set, a
  candidate index, a well-formed ``head ||| relation ||| tail``, a label dict).

An incomplete suite is allowed but reported (which CLUE 1.1 / FewCLUE files are missing), as are
the files the zip leaves out. Files of different leaderboards (CLUE 1.1, FewCLUE single-split,
FewCLUE five-split, KgCLUE, CLUENER, …) are never zipped together: each board scores its own zip.
When validation fails, or the check cannot run at all (a wrong ``--data``), a ``submission.zip``
left by an earlier run is removed, so a stale zip is never mistaken for the current predictions.
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from clueforge.tasks.io import TaskDataError
from clueforge.tasks.registry import FEWCLUE_SPLITS, SUITES, TASKS, Task, resolve_file, submission_names

# Where a task's files live under a data root. CLUE tasks: the official release folders first
# (``<task>_public``, as the CLUE downloads unpack: ``tnews_public``, ``cluewsc2020_public``, …), then
# this project's ../shared/data/tasks names. FewCLUE tasks: ``fewclue/<task>`` first.
_FOLDERS = {"msra-ner": ["msra_ner", "msra"], "cluewsc2020": ["cluewsc2020", "cluewsc"], "c3": ["c3"],
            "cmrc2018": ["cmrc2018", "cmrc"], "kgclue": ["kgclue"]}
# FewCLUE's layout reuses CLUE's short names (tnews, iflytek, ocnli, csl, chid, ...); its folders are
# recognisable by the five-split files. Such a folder never stands for a CLUE task's test data.
FEWCLUE_MARKERS = ("train_0.json", "dev_0.json")
ZIP_NAME = "submission.zip"


def is_fewclue_folder(folder: Path) -> bool:
    """Whether ``folder`` is FewCLUE's: it holds the five-split files (``train_0.json`` /
    ``dev_0.json``) or sits in a ``fewclue/`` folder (FewCLUE's layout, test files only)."""
    folder = Path(folder).absolute()
    return folder.parent.name.lower() == "fewclue" or any((folder / m).is_file() for m in FEWCLUE_MARKERS)


def _task_candidates(root: Path, task: Task) -> list[Path]:
    short = task.name.removeprefix("fewclue-")
    if task.name.startswith("fewclue-"):
        names = ["fewclue/" + short, short, task.name]
    else:
        names = [f"{task.name}_public", f"{short}_public"] + _FOLDERS.get(task.name, []) + [task.name, short]
    return [root / n for n in dict.fromkeys(names)] + [root]


def _holds_task(folder: Path, task: Task) -> bool:
    files = task.files.get("test", "").split(",") + task.files.get("dev", "").split(",")
    return any((folder / f).is_file() for f in files if f)


def task_dir(root: Path, task: Task) -> Path | None:
    """The folder of ``task`` under ``root`` (``root`` itself if it holds the task's files). For a
    CLUE task a FewCLUE folder (``is_fewclue_folder``) is never taken: FewCLUE's ``tnews/test.json``
    is not CLUE TNEWS' test file."""
    for c in _task_candidates(Path(root), task):
        if _holds_task(c, task) and (task.name.startswith("fewclue-") or not is_fewclue_folder(c)):
            return c
    return None


def missing_task_dir_reason(root: Path, task: Task) -> str:
    """Why ``task_dir`` found no folder: names the FewCLUE folders it refused for a CLUE task."""
    root = Path(root)
    few = [c for c in _task_candidates(root, task) if _holds_task(c, task) and is_fewclue_folder(c)]
    if few and not task.name.startswith("fewclue-"):
        return (f"no test data for {task.name} under {root}: {', '.join(map(str, few))} holds FewCLUE data "
                f"({' / '.join(FEWCLUE_MARKERS)}, or a fewclue/ folder), not CLUE's; put CLUE's release folder "
                f"{task.name}_public/ (or {task.name}/) under the root")
    return f"no test data for {task.name} under {root}"


def leaderboard_files() -> dict[str, Task]:
    """Every official prediction file name → its task."""
    return {name: t for t in TASKS.values() for name in submission_names(t)}


_OWN_BOARDS = {"kgclue": "KgCLUE", "cluener": "CLUENER", "msra-ner": "MSRA-NER", "drcd": "DRCD"}


def leaderboard_of(name: str) -> str:
    """The leaderboard an official file name is submitted to: CLUE 1.1, FewCLUE (single files),
    FewCLUE five-split (``_0`` … ``_4``, ``_all``), or a task's own board (KgCLUE, CLUENER, …)."""
    task = leaderboard_files()[name]
    if task.name.startswith("fewclue-"):
        return "FewCLUE" if name == task.submission else "FewCLUE five-split"
    return _OWN_BOARDS.get(task.name, "CLUE 1.1")


def expected_suite_files() -> dict[str, tuple[str, ...]]:
    """The files of a complete submission to each leaderboard."""
    few = [TASKS[n].submission.removesuffix(".json") for n in SUITES["fewclue"]]
    return {"CLUE 1.1": tuple(TASKS[n].submission for n in SUITES["clue1.1"]),
            "FewCLUE": tuple(f"{s}.json" for s in few),
            "FewCLUE five-split": tuple(f"{s}_{k}.json" for s in few for k in FEWCLUE_SPLITS)}


def _close_stems(stem: str, stems: list[str]) -> list[str]:
    """The stems ``stem`` most likely meant: itself, the known stems it shortens, the longest one it
    extends, else the most similar (none when nothing is similar enough)."""
    if stem in stems:
        return [stem]
    if longer := sorted((k for k in stems if k.startswith(stem)), key=len):
        return longer
    if shorter := [k for k in stems if stem.startswith(k)]:
        return [max(shorter, key=len)]
    ratio = {k: difflib.SequenceMatcher(None, stem, k).ratio() for k in stems}
    best = max(ratio.values())
    return sorted((k for k, r in ratio.items() if r >= max(0.6, best - 0.05)), key=lambda k: -ratio[k])


def _expected_names(name: str) -> list[str]:
    """The official names a wrong ``name`` most likely meant. A five-split suffix (``_0`` … ``_4``,
    ``_all``) exists only on FewCLUE, so with one only FewCLUE names are suggested
    (``iflytek_predict_all.json`` → ``iflytekf_predict_all.json``, not CLUE's ``iflytek_predict.json``);
    only when no FewCLUE task is close is the CLUE single file named (``afqmc_predict_0.json`` →
    ``afqmc_predict.json``)."""
    stem, _, rest = name.partition("_predict")
    m = re.fullmatch(r"_([0-4]|all)\.json", rest)
    split = m.group(1) if m else None
    stems = {t.submission.removesuffix("_predict.json"): t for t in TASKS.values()}
    if split:
        few = [k for k, t in stems.items() if t.name.startswith("fewclue-")]
        if close := _close_stems(stem, few):
            return [f"{k}_predict_{split}.json" for k in close]
    return [f"{k}_predict.json" for k in _close_stems(stem, list(stems))]


def _rows(path: Path, as_object: bool):
    """A JSON object (CMRC2018, CHID) or ``(line, object)`` per JSON line."""
    text = path.read_text(encoding="utf-8")
    if as_object:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{path.name}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise TaskDataError(f"{path.name}: expected one JSON object {{id: prediction}}")
        return obj
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path.name}:{lineno}: malformed JSON ({exc.msg})") from None
    return rows


def validate_file(path: Path, task: Task, data_root: Path) -> list[str]:
    """Problems of one prediction file (empty when it is fine)."""
    fam = importlib.import_module(f"clueforge.tasks.{task.family}")
    folder = task_dir(data_root, task)
    if folder is None:
        return [f"{path.name}: {missing_task_dir_reason(data_root, task)}"]
    test_files = [resolve_file(task, folder / f) for f in task.files["test"].split(",")]
    missing = [str(f) for f in test_files if not f.is_file()]
    if missing:
        return [f"{path.name}: test file {missing[0]} not found"]
    state = fam.prepare(task, folder) if hasattr(fam, "prepare") and task.family != "kgclue" else {}
    examples = [e for f in test_files for e in fam.load(task, f, state, False)]
    test_name = ",".join(f.name for f in test_files)
    got = _rows(path, as_object=task.family == "span" or task.fmt == "chid_clue")
    problems: list[str] = []
    by_id = {e["id"]: e for e in examples}
    if isinstance(got, dict):  # CMRC2018 / CHID: {id: prediction}, no order
        by_key = {str(k): e for k, e in by_id.items()}
        for i in by_id:
            if str(i) not in got:
                problems.append(f"{path.name}: id {i}: no prediction")
        for k, v in got.items():
            if k not in by_key:
                problems.append(f"{path.name}: id {k}: not in the test file")
            elif (p := fam.check_prediction(task, v, by_key[k], state)):
                problems.append(f"{path.name}: id {k}: {p}")
        return problems
    seen: dict = {}
    order: list[tuple[int, object]] = []
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
            continue
        seen[i] = lineno
        order.append((lineno, i))
        if (p := fam.check_prediction(task, row, by_id[i], state)):
            problems.append(f"{path.name}:{lineno}: id {i!r}: {p}")
    for e in examples:
        if e["id"] not in seen:
            problems.append(f"{path.name}: id {e['id']!r}: no prediction")
    if len(order) == len(examples):  # every id once: check they follow the test file's order
        wrong = [(k, lineno, i) for k, (lineno, i) in enumerate(order) if i != examples[k]["id"]]
        if wrong:
            k, lineno, i = wrong[0]
            problems.append(f"{path.name}:{lineno}: id {i!r} where {test_name} has id {examples[k]['id']!r} "
                            f"(record {k + 1}): predictions must follow the test file's order "
                            f"({len(wrong)} line(s) out of order)")
    return problems


@dataclass
class SubmissionCheck:
    files: list[Path] = field(default_factory=list)
    """Prediction files with official names (what the zip holds)."""
    problems: list[str] = field(default_factory=list)
    """Anything that would score 0: nothing is zipped while there is one."""
    notes: list[str] = field(default_factory=list)
    """Allowed but worth knowing: missing suite files, ignored files, a removed stale zip."""


def check_submission(pred_dir: Path, data_root: Path) -> SubmissionCheck:
    """Validate every prediction file in ``pred_dir``; say what is missing and what is ignored."""
    pred_dir, data_root = Path(pred_dir), Path(data_root)
    if not pred_dir.is_dir():
        raise TaskDataError(f"{pred_dir}: no such folder of predictions")
    if not data_root.is_dir():
        raise TaskDataError(f"--data {data_root}: no such folder (the root holding the tasks' test files)")
    known = leaderboard_files()
    check = SubmissionCheck()
    ignored = []
    for f in sorted(pred_dir.iterdir()):
        if f.name == ZIP_NAME or f.name.startswith(ZIP_NAME + ".tmp"):
            continue
        if f.is_file() and f.name in known:
            check.files.append(f)
        elif f.is_file() and "_predict" in f.name:
            close = _expected_names(f.name)
            hint = (f"expected {' or '.join(close)}" if close else
                    f"known: {', '.join(t.submission for t in TASKS.values())}, and FewCLUE's "
                    f"<name>_predict_{{0..4,all}}.json")
            check.problems.append(f"{f.name}: not a leaderboard file name; {hint}")
        else:
            ignored.append(f.name + ("/" if f.is_dir() else ""))
    if not check.files and not check.problems:
        check.problems.append(f"{pred_dir}: no leaderboard prediction files (*_predict.json)")
    for f in check.files:
        try:
            check.problems.extend(validate_file(f, known[f.name], data_root))
        except (TaskDataError, FileNotFoundError) as exc:
            check.problems.append(str(exc))
    boards: dict[str, list[str]] = {}
    for f in check.files:
        boards.setdefault(leaderboard_of(f.name), []).append(f.name)
    if len(boards) > 1:  # each board scores its own zip: the others' files would be lost or fail it
        check.problems.append("files of several leaderboards in one folder; zip each board's files on their own: "
                              + "; ".join(f"{b}: {', '.join(n)}" for b, n in boards.items()))
    present = {f.name for f in check.files}
    for suite, names in expected_suite_files().items():
        have = [n for n in names if n in present]
        if have and len(have) < len(names):
            missing = [n for n in names if n not in present]
            check.notes.append(f"incomplete {suite} submission: {len(have)}/{len(names)} files; missing "
                               f"{', '.join(missing)}")
    if ignored:
        check.notes.append(f"ignored (not leaderboard files, left out of the zip): {', '.join(ignored)}")
    return check


def write_zip(files: list[Path], out_zip: Path) -> Path:
    """The files under their own names, fixed timestamps, written to a temporary name and renamed."""
    out_zip = Path(out_zip)
    tmp = out_zip.with_name(out_zip.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            info = zipfile.ZipInfo(f.name, date_time=(2020, 1, 1, 0, 0, 0))
            zf.writestr(info, f.read_bytes(), zipfile.ZIP_DEFLATED)
    tmp.replace(out_zip)
    return out_zip


def submit(pred_dir: Path, data_root: Path, out_zip: Path | None = None) -> tuple[Path, SubmissionCheck]:
    """Check ``pred_dir``; zip its files when all are valid, else remove a stale zip (noted)."""
    out_zip = Path(out_zip or Path(pred_dir) / ZIP_NAME)
    try:
        check = check_submission(pred_dir, data_root)
    except Exception as exc:  # e.g. a wrong --data: the old zip must not outlive a failed check either
        if out_zip.exists():
            out_zip.unlink()
            if isinstance(exc, TaskDataError):
                raise TaskDataError(f"{exc}; removed the stale {out_zip}") from None
        raise
    if not check.problems:
        write_zip(check.files, out_zip)
    elif out_zip.exists():
        out_zip.unlink()
        check.notes.append(f"removed the stale {out_zip} (validation failed)")
    return out_zip, check


def validate_and_zip(pred_dir: Path, data_root: Path, out_zip: Path | None = None) -> tuple[Path, list[str]]:
    """``submit`` returning ``(zip path, problems)``."""
    out_zip, check = submit(pred_dir, data_root, out_zip)
    return out_zip, check.problems
