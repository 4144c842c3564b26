"""Task metrics, each the official scorer's formula.

- accuracy (classification, choice);
- CMRC2018/DRCD: the official ``cmrc2018_evaluate.py`` EM and F1, reported separately (the
  leaderboard ranks by EM); F1's non-Chinese runs are tokenised with nltk as the official script does;
- MSRA NER: entity-level micro P/R/F1 over ``(type, start, end)`` spans;
- CLUENER: the official ``score.py`` — per type, F1 over the entity *strings* of each line (the
  keys of its label dict), then the macro average over the 10 types;
- KgCLUE: the official ``evaluate_f1_em.py`` — lower-case and collapse whitespace, EM, and
  F1 = 2·LCS/(|a| + |b|) with LCS the longest common character subsequence; Score = 0.5·EM + 0.5·F1,
  all on the answer's tail (``O``).
"""

from __future__ import annotations

import functools
import re

# The official CMRC2018 evaluation's punctuation list, kept as a list of strings on purpose: its
# membership test is per character, so the two-character entry "……" never matches a single "…".
_CMRC_SP = ["-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：", "？", "！", "“", "”", "；", "’", "《",
            "》", "……", "·", "、", "「", "」", "（", "）", "－", "～", "『", "』"]


def accuracy(pred: list, gold: list) -> float:
    if not gold:
        return 0.0
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


@functools.cache
def _nltk_words():
    """nltk's ``NLTKWordTokenizer`` (regular expressions only: no data download). It is what
    ``nltk.word_tokenize`` runs on each sentence; ``word_tokenize`` first splits sentences with the
    Punkt model (a data download), which only matters for a sentence-final period inside a
    non-Chinese run that goes on after it ("a. b") — a case the answers practically never have."""
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize


def _cmrc_segment(text: str) -> list[str]:
    """CMRC's ``mixed_segmentation(rm_punc=True)``: listed punctuation dropped (without ending the
    current run: "2cm（0.79" is one run "2cm0.79"), each CJK character a token, every other run
    tokenised by nltk as the official script does ("10km", "50％", "2cm0.79" stay whole; "don't" is
    "do", "n't")."""
    out: list[str] = []
    buf = ""
    for ch in str(text).lower().strip():
        if ch in _CMRC_SP:
            continue
        if re.match(r"[\u4e00-\u9fa5]", ch):
            if buf:
                out.extend(_nltk_words()(buf))
                buf = ""
            out.append(ch)
        else:
            buf += ch
    if buf:
        out.extend(_nltk_words()(buf))
    return out


def _cmrc_strip(text: str) -> str:
    """CMRC's ``remove_punctuation``: lower-cased, stripped, listed punctuation removed."""
    return "".join(ch for ch in str(text).lower().strip() if ch not in _CMRC_SP)


def cmrc_f1(pred: str, answers: list[str]) -> float:
    """Max over answers of the F1 of the longest common substring of the segmented tokens."""
    best = 0.0
    p_tok = _cmrc_segment(pred)
    for ans in answers:
        a_tok = _cmrc_segment(ans)
        lcs = _lcs_tokens(p_tok, a_tok)
        if lcs == 0:
            continue
        precision, recall = lcs / len(p_tok), lcs / len(a_tok)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _lcs_tokens(a: list[str], b: list[str]) -> int:
    best = 0
    prev = [0] * (len(b) + 1)
    for i in range(1, len(a) + 1):
        cur = [0] * (len(b) + 1)
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def cmrc_em(pred: str, answers: list[str]) -> float:
    p = _cmrc_strip(pred)
    return float(any(p == _cmrc_strip(a) for a in answers))


def cmrc_scores(preds: list[str], golds: list[list[str]]) -> dict[str, float]:
    n = max(1, len(golds))
    em = sum(cmrc_em(p, g) for p, g in zip(preds, golds)) / n
    f1 = sum(cmrc_f1(p, g) for p, g in zip(preds, golds)) / n
    return {"em": 100 * em, "f1": 100 * f1}


def bio_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Entities ``(type, start, end_inclusive)`` from BIO tags; an I- without its B- starts one."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        if tag.startswith("B-") or tag == "O" or (tag.startswith("I-") and tag[2:] != kind):
            if start is not None:
                spans.add((kind, start, i - 1))
                start, kind = None, None
            if tag.startswith(("B-", "I-")):
                start, kind = i, tag[2:]
    return spans


def entity_prf(pred: list[list[str]], gold: list[list[str]]) -> dict[str, float]:
    """Entity-level micro P/R/F1 of BIO tag sequences (MSRA NER)."""
    return span_prf([bio_spans(p) for p in pred], [bio_spans(g) for g in gold])


CLUENER_TYPES = ("address", "book", "company", "game", "government", "movie", "name", "organization", "position",
                 "scene")


def cluener_scores(pred: list[dict], gold: list[dict], types=CLUENER_TYPES) -> dict[str, float]:
    """The official CLUENER ``score.py``: ``pred``/``gold`` are label dicts ``{type: {entity: spans}}``
    per line; per type, an entity string of a line counts once (TP if the gold line has it, else
    FP; a gold string not predicted is an FN); P, R, F1 per type (0 where undefined, where the
    official script divides by zero); ``macro_f1`` is their mean over the types."""
    out, total = {}, 0.0
    for kind in types:
        tp = fp = fn = 0
        for p, g in zip(pred, gold):
            ps, gs = set((p or {}).get(kind, {})), set((g or {}).get(kind, {}))
            tp += len(ps & gs)
            fp += len(ps - gs)
            fn += len(gs - ps)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[f"f1_{kind}"] = 100 * f1
        total += f1
    return {"macro_f1": 100 * total / len(types), **out}


def span_prf(pred: list[set], gold: list[set]) -> dict[str, float]:
    """Micro P/R/F1 over sets of ``(type, start, end)`` spans per example."""
    tp = sum(len(p & g) for p, g in zip(pred, gold))
    n_pred, n_gold = sum(map(len, pred)), sum(map(len, gold))
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1}


def kgclue_normalize(text: str) -> str:
    """The official KgCLUE ``normalize``: lower-cased, whitespace runs collapsed to one space."""
    return " ".join(str(text).lower().split())


def lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings (what ``pylcs.lcs`` computes)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if ca == cb else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def kgclue_f1(pred: str, gold: str) -> float:
    """The official ``f1_sim``: 2·LCS/(|a| + |b|); two empty strings score 0."""
    if not pred and not gold:
        return 0.0
    return 2 * lcs_length(pred, gold) / (len(pred) + len(gold))


def kgclue_scores(preds: list[str], golds: list[str]) -> dict[str, float]:
    """KgCLUE's official EM, F1 and Score (0.5·EM + 0.5·F1) on the answers' tails, normalised."""
    em = f1 = 0.0
    for p, g in zip(preds, golds):
        p, g = kgclue_normalize(p), kgclue_normalize(g)
        em += float(p == g)
        f1 += kgclue_f1(p, g)
    n = max(1, len(golds))
    return {"em": 100 * em / n, "f1": 100 * f1 / n, "score": 100 * (0.5 * em + 0.5 * f1) / n}
