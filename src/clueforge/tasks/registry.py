"""Every CLUE-family task: where its data is, how it reads, what it predicts, how it is scored and
submitted. A task is data, not a class: its ``family`` module holds the behaviour (loading,
encoding, head, decoding, metric, submission), shared by all tasks of that family.

Hyper-parameters follow the CLUE baselines (epochs 3/3/3/2/5/50/5/2/3/8 for AFQMC, TNEWS,
IFLYTEK, CMNLI, OCNLI, WSC, CSL, CMRC, CHID, C3; max length 128, CSL 256, CMRC 512, CHID 64,
C3 512). FewCLUE tasks use the same shapes with more epochs (the training sets are tiny).

Submission names are the official ones: CLUE 1.1 ``<task>[11]_predict.json`` (CLUE's submission
guide), FewCLUE as in its ``resources/fewclue_submit_examples`` (``eprstmt_``, ``csldcp_``,
``bustm_`` without the ``f`` the other six carry) and, for the five-split protocol,
``<name>_predict_0.json`` … ``_4`` and ``_all`` (``resources/fewclue_m_submit_examples``).
The dev metric is the leaderboard's: CMRC2018 ranks by EM (F1 beside it), CLUENER by the macro
F1 over its 10 types, KgCLUE by Score = 0.5·EM + 0.5·F1.

OCNLI's official release ships ``train.50k.json``, ``train.10k.json`` and ``train.3k.json``: without a
``train.json`` the first of those present is read (``--set train_file=train.10k.json`` picks one).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

OCNLI_LABELS = ("contradiction", "entailment", "neutral")
TNEWS_LABELS = tuple(str(x) for x in range(100, 117) if x not in (105, 111))
IFLYTEK_LABELS = tuple(str(i) for i in range(119))


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    """classify | choice | span | ner | kgclue (a module of ``clueforge.tasks``)."""
    fmt: str
    """Input variant within the family (pair, single, csl, wsc, c3, chid_clue, chid_few, squad, bio, cluener, kgclue)."""
    files: dict[str, str]
    """split → file name inside the task folder."""
    labels: tuple[str, ...] | None = None
    """Fixed label set; ``None``: read from the data (``labels_all.txt`` or train ∪ dev)."""
    label_field: str = "label"
    text_fields: tuple[str, ...] = ("sentence",)
    id_field: str = "id"
    epochs: int = 3
    max_length: int = 128
    lr: float = 3e-5
    batch_size: int = 32
    metric: str = "accuracy"
    """The dev metric that picks the best epoch: the leaderboard's headline metric."""
    also: tuple[str, ...] = ()
    """Other metrics reported beside the headline (CMRC's F1, CLUENER's span-level micro F1, …)."""
    submission: str = ""
    """Leaderboard file name."""
    extra: dict = field(default_factory=dict)
    alternatives: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """file name → official names to use when it is absent (OCNLI ships ``train.50k.json``, …)."""


FEWCLUE_SPLITS = ("0", "1", "2", "3", "4", "all")
"""Suffixes of the five-split protocol's files: ``<name>_predict_<split>.json``."""


def _few(name, fmt, stem=None, **kw) -> Task:
    files = {"train": "train.json", "dev": "dev.json", "test": "test.json"}
    base = dict(epochs=20, batch_size=16, lr=3e-5, submission=f"{stem or name + 'f'}_predict.json")
    return Task(f"fewclue-{name}", files=files, fmt=fmt, **{**base, **kw})


_CLUE_FILES = {"train": "train.json", "dev": "dev.json", "test": "test.json"}

TASKS: dict[str, Task] = {t.name: t for t in [
    # CLUE 1.1 ------------------------------------------------------------------------------
    Task("afqmc", "classify", "pair", _CLUE_FILES, ("0", "1"), text_fields=("sentence1", "sentence2"), epochs=3,
         lr=2e-5, submission="afqmc_predict.json"),
    Task("tnews", "classify", "single", _CLUE_FILES, TNEWS_LABELS, epochs=3, lr=2e-5, submission="tnews11_predict.json",
         extra={"desc_field": "label_desc"}),
    Task("iflytek", "classify", "single", _CLUE_FILES, IFLYTEK_LABELS, epochs=3, lr=2e-5,
         submission="iflytek_predict.json", extra={"desc_field": "label_des"}),
    Task("cmnli", "classify", "pair", _CLUE_FILES, OCNLI_LABELS, text_fields=("sentence1", "sentence2"), epochs=2,
         lr=3e-5, submission="cmnli_predict.json"),
    Task("ocnli", "classify", "pair", _CLUE_FILES, OCNLI_LABELS, text_fields=("sentence1", "sentence2"), epochs=5,
         lr=3e-5, submission="ocnli_50k_predict.json",
         alternatives={"train.json": ("train.50k.json", "train.10k.json", "train.3k.json")}),
    Task("cluewsc2020", "classify", "wsc", _CLUE_FILES, ("false", "true"), text_fields=("text",), id_field="idx",
         epochs=50, lr=1e-5, batch_size=8, submission="cluewsc11_predict.json"),
    Task("csl", "classify", "csl", _CLUE_FILES, ("0", "1"), text_fields=("keyword", "abst"), epochs=5, max_length=256,
         lr=1e-5, submission="csl_predict.json"),
    Task("cmrc2018", "span", "squad", {"train": "train.json", "dev": "dev.json", "test": "test.json"}, epochs=2,
         max_length=512, lr=3e-5, batch_size=16, metric="em", also=("f1",), submission="cmrc2018_predict.json"),
    Task("chid", "choice", "chid_clue", {"train": "train.json", "dev": "dev.json", "test": "test1.1.json"}, epochs=3,
         max_length=64, lr=2e-5, batch_size=16, submission="chid11_predict.json"),
    Task("c3", "choice", "c3", {"train": "m-train.json,d-train.json", "dev": "m-dev.json,d-dev.json",
                                "test": "test1.1.json"}, epochs=8, max_length=512, lr=2e-5, batch_size=8,
         submission="c311_predict.json"),
    # FewCLUE --------------------------------------------------------------------------------
    _few("eprstmt", "single", stem="eprstmt", family="classify", labels=("Negative", "Positive")),
    _few("csldcp", "single", stem="csldcp", family="classify", labels=None, text_fields=("content",), max_length=256),
    _few("tnews", "single", family="classify", labels=TNEWS_LABELS, extra={"desc_field": "label_desc"}),
    _few("iflytek", "single", family="classify", labels=IFLYTEK_LABELS, max_length=256,
         extra={"desc_field": "label_des"}),
    _few("ocnli", "pair", family="classify", labels=OCNLI_LABELS, text_fields=("sentence1", "sentence2")),
    _few("bustm", "pair", stem="bustm", family="classify", labels=("0", "1"), text_fields=("sentence1", "sentence2")),
    _few("chid", "chid_few", family="choice", label_field="answer", max_length=128),
    _few("csl", "csl", family="classify", labels=("0", "1"), text_fields=("keyword", "abst"), max_length=256),
    _few("cluewsc", "wsc", family="classify", labels=("false", "true"), text_fields=("text",)),
    # KgCLUE, NER, DRCD ------------------------------------------------------------------------
    Task("kgclue", "kgclue", "kgclue", _CLUE_FILES, label_field="answer", text_fields=("question",), epochs=3,
         max_length=64, lr=3e-5, batch_size=32, metric="score", also=("em", "f1", "recall"),
         submission="kgclue_predict.json"),
    Task("msra-ner", "ner", "bio", {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"},
         ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"), epochs=3, max_length=256, lr=3e-5,
         batch_size=32, metric="f1", submission="msra_ner_predict.json"),
    Task("cluener", "ner", "cluener", _CLUE_FILES,
         ("O",) + tuple(f"{p}-{t}" for t in ("address", "book", "company", "game", "government", "movie", "name",
                                             "organization", "position", "scene") for p in ("B", "I")),
         text_fields=("text",), epochs=5, max_length=64, lr=3e-5, batch_size=32, metric="macro_f1",
         also=("span_f1",), submission="cluener_predict.json"),
    Task("drcd", "span", "squad", {"train": "train.json", "dev": "dev.json", "test": "test.json"}, epochs=2,
         max_length=512, lr=3e-5, batch_size=16, metric="em", also=("f1",), submission="drcd_predict.json"),
]}

SUITES: dict[str, tuple[str, ...]] = {
    "clue1.1": ("afqmc", "tnews", "iflytek", "cmnli", "ocnli", "cluewsc2020", "csl", "cmrc2018", "chid", "c3"),
    "fewclue": tuple(n for n in TASKS if n.startswith("fewclue-")),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


def submission_names(task: Task) -> tuple[str, ...]:
    """Every leaderboard file name of ``task``: the single file, and for FewCLUE the five-split ones."""
    if not task.name.startswith("fewclue-"):
        return (task.submission,)
    stem = task.submission.removesuffix(".json")
    return (task.submission,) + tuple(f"{stem}_{s}.json" for s in FEWCLUE_SPLITS)


def resolve_file(task: Task, path: Path) -> Path:
    """``path``, or the first official alternative name beside it that exists (OCNLI's
    ``train.50k.json`` / ``train.10k.json`` / ``train.3k.json`` for ``train.json``)."""
    path = Path(path)
    if path.is_file():
        return path
    for alt in task.alternatives.get(path.name, ()):
        if (path.parent / alt).is_file():
            return path.parent / alt
    return path


def with_overrides(task: Task, **kw) -> Task:
    return replace(task, **{k: v for k, v in kw.items() if v is not None})
