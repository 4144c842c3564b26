"""Task metrics: accuracy, the official CMRC2018 EM/F1, entity-level NER P/R/F1, KgCLUE EM/F1."""

from __future__ import annotations

import re
from collections import Counter

# The official CMRC2018 evaluation's punctuation list, kept as a list of strings on purpose: its
# membership test is per character, so the two-character entry "……" never matches a single "…".
_CMRC_SP = ["-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：", "？", "！", "“", "”", "；", "’", "《",
            "》", "……", "·", "、", "「", "」", "（", "）", "－", "～", "『", "』"]
_WORD = re.compile(r"\d+(?:[.,]\d+)*|\w+|[^\w\s]")


def accuracy(pred: list, gold: list) -> float:
    if not gold:
        return 0.0
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def _cmrc_segment(text: str) -> list[str]:
    """CMRC's ``mixed_segmentation(rm_punc=True)``: listed punctuation dropped, each CJK character
    a token, other runs split into words and symbols (the official script's nltk ``word_tokenize``,
    approximated by a regular expression: numbers like 3.14 stay whole)."""
    out: list[str] = []
    buf = ""
    for ch in str(text).lower().strip():
        if ch in _CMRC_SP:
            continue
        if re.match(r"[\u4e00-\u9fa5]", ch):
            if buf:
                out.extend(_WORD.findall(buf))
                buf = ""
            out.append(ch)
        else:
            buf += ch
    if buf:
        out.extend(_WORD.findall(buf))
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
    return {"em": 100 * em, "f1": 100 * f1, "avg": 100 * (em + f1) / 2}


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
    tp = n_pred = n_gold = 0
    for p, g in zip(pred, gold):
        ps, gs = bio_spans(p), bio_spans(g)
        tp += len(ps & gs)
        n_pred += len(ps)
        n_gold += len(gs)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1}


def kgclue_scores(preds: list[str], golds: list[str]) -> dict[str, float]:
    """KgCLUE: EM on the answer (tail) string and character-level F1, averaged."""
    em = f1 = 0.0
    for p, g in zip(preds, golds):
        p, g = p.strip(), g.strip()
        em += float(p == g)
        common = sum((Counter(p) & Counter(g)).values())
        if common:
            pr, rc = common / len(p), common / len(g)
            f1 += 2 * pr * rc / (pr + rc)
    n = max(1, len(golds))
    return {"em": 100 * em / n, "f1": 100 * f1 / n, "avg": 100 * (em + f1) / (2 * n)}
