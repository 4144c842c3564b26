"""Prompts as data: templates and verbalizers read from YAML files.

A prompt file (``yaml.safe_load``) names the tasks it serves and holds one or more templates::

    tasks: [fewclue-eprstmt]
    templates:
      satisfied:                          # the name --template picks; the first is the default
        pattern: "[MASK]满意。{sentence}"  # exactly one [MASK]: the label word goes there
        verbalizer: {Negative: 不, Positive: 很}
        score: mean                       # mean (default) or sum of the word's per-token log-probs

``[MASK]`` stands for the whole label word and becomes as many [MASK] tokens as the word has
tokens, all predicted in one forward (words of different lengths get one row each per length).
``{slot}`` names depend on the task's input format (``SLOTS``); ``verbalizer: candidates`` scores
the example's own candidates (CHID: each idiom in the blank). Every problem is one line naming the
file and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from clueforge.tasks.registry import TASKS, Task

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
MASK = "[MASK]"
SCORES = ("mean", "sum")

SLOTS: dict[str, tuple[str, ...]] = {
    "single": ("sentence",),
    "pair": ("sentence1", "sentence2"),
    "csl": ("keywords", "abstract"),
    "wsc": ("text", "span1", "span2"),
    "chid_few": ("before", "after"),
    "chid_clue": ("before", "after"),
}
"""Slots a pattern may use, per task input format (``Task.fmt``)."""

_SLOT = re.compile(r"\{(\w*)\}")


class PromptError(ValueError):
    """A bad prompt file: the message names the file and the field."""


@dataclass(frozen=True)
class Template:
    name: str
    pattern: str
    verbalizer: dict[str, str] | None
    """label → word; ``None``: the example's candidates are the words (CHID)."""
    score: str = "mean"
    source: str = ""
    """``file: templates.NAME`` for error messages."""

    def pieces(self) -> list[tuple[str, str]]:
        """The pattern as ``("text", literal) | ("slot", name) | ("mask", "")`` in order."""
        out: list[tuple[str, str]] = []
        before, after = self.pattern.split(MASK)
        for part, tail in ((before, True), (after, False)):
            pos = 0
            for m in _SLOT.finditer(part):
                if m.start() > pos:
                    out.append(("text", part[pos:m.start()]))
                out.append(("slot", m.group(1)))
                pos = m.end()
            if pos < len(part):
                out.append(("text", part[pos:]))
            if tail:
                out.append(("mask", ""))
        return out


def _err(where: str, msg: str) -> PromptError:
    return PromptError(f"{where}: {msg}")


def load_file(path: str | Path) -> tuple[tuple[str, ...], list[Template]]:
    """``(tasks, templates)`` of one prompt file, validated apart from the task's labels."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{path}: no such prompt file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PromptError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(raw, dict):
        raise _err(str(path), "expected a mapping with 'tasks' and 'templates'")
    unknown = sorted(set(raw) - {"tasks", "templates"})
    if unknown:
        raise _err(f"{path}: {unknown[0]}", "unknown field (known: tasks, templates)")
    tasks = raw.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise _err(f"{path}: tasks", "expected a task name or a list of task names")
    unknown_tasks = [t for t in tasks if t not in TASKS]
    if unknown_tasks:
        raise _err(f"{path}: tasks", f"unknown task {unknown_tasks[0]!r} (see `clueforge tasks`)")
    templates = raw.get("templates")
    if not isinstance(templates, dict) or not templates:
        raise _err(f"{path}: templates", "expected a mapping name → {pattern, verbalizer}")
    out = [_template(str(name), body, f"{path}: templates.{name}") for name, body in templates.items()]
    return tuple(tasks), out


def _template(name: str, body, where: str) -> Template:
    if not isinstance(body, dict):
        raise _err(where, "expected a mapping with 'pattern' and 'verbalizer'")
    unknown = sorted(set(body) - {"pattern", "verbalizer", "score"})
    if unknown:
        raise _err(f"{where}.{unknown[0]}", "unknown field (known: pattern, verbalizer, score)")
    pattern = body.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise _err(f"{where}.pattern", "missing or not a string")
    if pattern.count(MASK) != 1:
        raise _err(f"{where}.pattern", f"needs exactly one {MASK} (it stands for the whole label word), "
                                       f"found {pattern.count(MASK)}")
    verb = body.get("verbalizer")
    if verb == "candidates":
        verbalizer = None
    elif isinstance(verb, dict) and verb:
        verbalizer = {}
        for label, word in verb.items():
            if not isinstance(word, (str, int)) or not str(word).strip():
                raise _err(f"{where}.verbalizer.{label}", "the label word must be a non-empty string")
            verbalizer[str(label)] = str(word).strip()
    else:
        raise _err(f"{where}.verbalizer", "missing: expected a mapping label → word, or 'candidates'")
    score = body.get("score", "mean")
    if score not in SCORES:
        raise _err(f"{where}.score", f"{score!r}: expected one of {', '.join(SCORES)}")
    return Template(name, pattern, verbalizer, score, where)


def check_for_task(t: Template, task: Task, labels: list[str] | None) -> None:
    """Slots the task's format provides, a verbalizer for every label (or candidates for CHID)."""
    slots = SLOTS.get(task.fmt)
    if slots is None:
        raise _err(t.source, f"task {task.name} ({task.family}/{task.fmt}) cannot be prompted")
    for kind, value in t.pieces():
        if kind == "slot" and value not in slots:
            raise _err(f"{t.source}.pattern", f"unknown slot {{{value}}} for {task.name} (slots: "
                                              f"{', '.join('{' + s + '}' for s in slots)})")
    if task.family == "choice":
        if t.verbalizer is not None:
            raise _err(f"{t.source}.verbalizer", f"{task.name} scores its candidates: write 'verbalizer: candidates'")
        return
    if t.verbalizer is None:
        raise _err(f"{t.source}.verbalizer", f"{task.name} has fixed labels: map each label to a word")
    if labels is not None:
        missing = [lab for lab in labels if lab not in t.verbalizer]
        if missing:
            raise _err(f"{t.source}.verbalizer", f"no word for label(s) {', '.join(missing[:5])}")
        extra = [lab for lab in t.verbalizer if lab not in labels]
        if extra:
            raise _err(f"{t.source}.verbalizer.{extra[0]}", f"not a label of {task.name}")


def shipped_files() -> list[Path]:
    return sorted(SHIPPED_DIR.glob("*.yaml"))


def templates_for(task: Task, prompts: str | Path | None = None) -> list[Template]:
    """The templates for ``task``: from ``prompts`` (a YAML file) if given, else the shipped ones."""
    files = [Path(prompts)] if prompts else shipped_files()
    found: list[Template] = []
    for f in files:
        tasks, templates = load_file(f)
        if task.name in tasks:
            found.extend(templates)
    if not found:
        where = str(prompts) if prompts else f"shipped prompts ({SHIPPED_DIR})"
        raise PromptError(f"{where}: tasks: no templates for {task.name}")
    return found


def pick(templates: list[Template], name: str | None) -> Template:
    if name is None:
        return templates[0]
    for t in templates:
        if t.name == name:
            return t
    raise PromptError(f"{templates[0].source.split(': templates.')[0]}: templates: no template {name!r} "
                      f"(known: {', '.join(t.name for t in templates)})")
