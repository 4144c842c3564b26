"""Leaderboard-exact submissions and metrics (issue 10), KgCLUE's train-only knowledge base and
labelled published comparisons (issue 8 item 10), `submit`'s reports and errors (issue 9).

Fixtures follow the official formats: FewCLUE test files under ``fixtures/tasks/leaderboard``
(ids of FewCLUE's ``resources/fewclue_submit_examples``), OCNLI's ``train.50k/10k/3k.json``,
KgCLUE's ``{id, question, answer: "head ||| relation ||| tail"}``. Metric values are the official
formulas recomputed by hand.
"""

import importlib
import json
import zipfile
from pathlib import Path

import pytest

from clueforge.tasks import classify, kgclue, ner, span
from clueforge.tasks.metrics import cluener_scores, kgclue_scores, lcs_length
from clueforge.tasks.registry import SUITES, TASKS
from clueforge.tasks.submit import task_dir, validate_and_zip
from conftest import ROOT

FIX = ROOT / "tests" / "fixtures" / "tasks"
LB = FIX / "leaderboard"  # FewCLUE test files only: a submission root, not a training folder

OFFICIAL_FEWCLUE = ["eprstmt_predict.json", "csldcp_predict.json", "tnewsf_predict.json", "iflytekf_predict.json",
                    "ocnlif_predict.json", "bustm_predict.json", "chidf_predict.json", "cslf_predict.json",
                    "cluewscf_predict.json"]
OFFICIAL_CLUE = ["afqmc_predict.json", "tnews11_predict.json", "iflytek_predict.json", "cmnli_predict.json",
                 "ocnli_50k_predict.json", "cluewsc11_predict.json", "csl_predict.json", "cmrc2018_predict.json",
                 "chid11_predict.json", "c311_predict.json"]


def _valid_rows(task, root: Path):
    """A valid prediction for every test id, in the test file's order (first label / choice 0)."""
    fam = importlib.import_module(f"clueforge.tasks.{task.family}")
    folder = task_dir(root, task)
    state = fam.prepare(task, folder) if hasattr(fam, "prepare") else {}
    ex = [e for f in task.files["test"].split(",") for e in fam.load(task, folder / f, state, False)]
    if task.family == "span":
        return {e["id"]: "答案" for e in ex}
    if task.fmt == "chid_clue":
        return {e["id"]: 0 for e in ex}
    if task.family == "choice":
        return [{"id": e["id"], task.label_field: 0} for e in ex]
    return [{"id": e["id"], task.label_field: state["labels"][0]} for e in ex]


def _write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(rows, dict):
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _by_file(names):
    return {TASKS[n].submission: TASKS[n] for n in names}


# ---- 1. FewCLUE names -----------------------------------------------------------------------------

def test_fewclue_official_single_layout_is_accepted(tmp_path):
    assert sorted(TASKS[n].submission for n in SUITES["fewclue"]) == sorted(OFFICIAL_FEWCLUE)
    for name, task in _by_file(SUITES["fewclue"]).items():
        _write(tmp_path / name, _valid_rows(task, LB))
    zip_path, problems = validate_and_zip(tmp_path, LB)
    assert problems == []
    assert sorted(zipfile.ZipFile(zip_path).namelist()) == sorted(OFFICIAL_FEWCLUE)


def test_fewclue_five_split_layout_is_accepted(tmp_path):
    names = []
    for name, task in _by_file(SUITES["fewclue"]).items():
        for split in ("0", "1", "2", "3", "4", "all"):
            names.append(name.replace(".json", f"_{split}.json"))
            _write(tmp_path / names[-1], _valid_rows(task, LB))
    assert "bustm_predict_all.json" in names and "chidf_predict_0.json" in names  # fewclue_m_submit_examples
    zip_path, problems = validate_and_zip(tmp_path, LB)
    assert problems == [] and sorted(zipfile.ZipFile(zip_path).namelist()) == sorted(names)


@pytest.mark.parametrize("wrong,expected", [("eprstmtf_predict.json", "eprstmt_predict.json"),
                                            ("csldcpf_predict.json", "csldcp_predict.json"),
                                            ("bustmf_predict.json", "bustm_predict.json"),
                                            ("tnews_predict.json", "tnews11_predict.json"),
                                            ("afqmc_predict_0.json", "afqmc_predict.json")])
def test_wrong_names_are_rejected_naming_the_expected_file(tmp_path, wrong, expected):
    _write(tmp_path / wrong, [{"id": 111, "label": "Negative"}])
    _, problems = validate_and_zip(tmp_path, LB)
    assert any(p.startswith(f"{wrong}: not a leaderboard file name; expected") and expected in p for p in problems)
    assert not (tmp_path / "submission.zip").exists()


# ---- 2. KgCLUE answers ----------------------------------------------------------------------------

def _official_split_ok(answer: str) -> bool:
    """What the official evaluate_f1_em.py does with an answer: unpack exactly three parts."""
    try:
        s, p, o = answer.split(" ||| ")
    except ValueError:
        return False
    return all(x.strip() for x in (s, p, o))


def test_kgclue_answers_are_always_well_formed():
    task = TASKS["kgclue"]
    kb = kgclue.KnowledgeBase([("刘晓华（广东工业大学教授）", "主讲课程", "《固体物理》"), ("北京", "人口", "2154万")])
    assert kb.candidates("刘晓华老师教哪门课") and kb.candidates("刘晓华老师教哪门课")[0][0].startswith("刘晓华")
    assert kb.candidates("晓华老师教什么课")  # no name in the question: the most similar names
    examples = [{"id": 0, "question": "ＸＹＺ？", "candidates": []}]  # nothing in common with the KB
    preds = kgclue.decode(task, [], [], examples, {"kb": kb})
    rows = kgclue.submission(task, examples, preds, {"kb": kb})
    assert _official_split_ok(rows[0]["answer"])
    assert kgclue.format_answer(("a ||| b", "", "c"), "q") == "a b ||| 未知 ||| c"


def test_submit_validates_exactly_the_official_separator(tmp_path):
    rows = [{"id": 0, "answer": "刘质平 ||| 老师 ||| 李叔同"}, {"id": 1, "answer": "南关町|||平假名|||みなみせきちょう"},
            {"id": 2, "answer": ""}]
    _write(tmp_path / "kgclue_predict.json", rows)
    _, problems = validate_and_zip(tmp_path, FIX)
    assert len(problems) == 2
    assert problems[0].startswith("kgclue_predict.json:2: id 1: answer '南关町|||平假名|||みなみせきちょう' is not")
    assert problems[1].startswith("kgclue_predict.json:3: id 2: answer '' is not")
    _write(tmp_path / "kgclue_predict.json", rows[:1] + [{"id": 1, "answer": "a ||| b ||| c ||| d"}])
    _, problems = validate_and_zip(tmp_path, FIX)
    assert any("id 1: answer 'a ||| b ||| c ||| d' is not" in p for p in problems)


# ---- 3. KgCLUE metric -----------------------------------------------------------------------------

def test_kgclue_official_metric_by_hand():
    s = kgclue_scores(["ab", "ABC", "北京 市"], ["ba", "abc", "北京市"])
    # normalised: "ab"/"ba" LCS 1 → 2/4; "abc"/"abc" EM → 1; "北京 市"/"北京市" LCS 3 → 6/7
    assert s["em"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * (0.5 + 1 + 6 / 7) / 3)  # 78.57
    assert round(s["em"], 1) == 33.3 and round(s["f1"], 1) == 78.6
    assert s["score"] == pytest.approx(0.5 * s["em"] + 0.5 * s["f1"])
    assert kgclue_scores(["  Foo   Bar "], ["foo bar"])["em"] == 100  # lower-cased, whitespace collapsed
    assert lcs_length("abcbdab", "bdcaba") == 4  # a subsequence, not a substring (that would be 2)


# ---- 4. CLUENER metric ----------------------------------------------------------------------------

def test_cluener_official_macro_f1_by_hand(tmp_path):
    f = tmp_path / "dev.json"
    lines = [{"text": "北京市政府在北京", "label": {"government": {"北京市政府": [[0, 4]]},
                                                  "address": {"北京市": [[0, 2]], "北京": [[6, 7]]}}},
             {"text": "我爱读三体", "label": {"book": {"三体": [[3, 4]]}}}]
    _write(f, lines)
    task = TASKS["cluener"]
    assert task.metric == "macro_f1"
    ex = ner.load(task, f, ner.prepare(task, tmp_path), True)
    preds = [["B-government"] + ["I-government"] * 4 + ["O", "B-address", "I-address"],
             ["O", "O", "O", "B-name", "I-name"]]
    s = ner.score(task, preds, ex)
    # government P = R = 1 → 1; address: {北京} vs {北京市, 北京} → P 1, R 1/2 → 2/3; book 0; name 0;
    # the other six types have neither gold nor predictions → 0. Macro over the 10 types:
    assert s["macro_f1"] == pytest.approx(100 * (1 + 2 / 3) / 10)
    # span micro F1 (extra column) against the gold spans as given, nested 北京市 included:
    # gold 4 spans, predicted 3, correct 2 → P 2/3, R 1/2 → F1 4/7
    assert s["span_f1"] == pytest.approx(400 / 7)
    assert cluener_scores([{"name": {"张三": [[0, 1]]}}], [{"name": {"张三": [[0, 1], [5, 6]]}}])["f1_name"] == 100


# ---- 5. CMRC2018 headline -------------------------------------------------------------------------

def test_cmrc_reports_em_and_f1_separately_and_compares_em_with_em():
    task = TASKS["cmrc2018"]
    assert task.metric == "em"
    from clueforge.tasks.suite import task_row

    s = span.score(task, ["曹雪芹所著", "东海"], [{"answers": ["曹雪芹"]}, {"answers": ["东海。"]}])
    assert s == pytest.approx({"em": 50.0, "f1": (75 + 100) / 2})
    row = task_row("cmrc2018", [s], "fine-tuning")
    assert row["mean"] == 50.0 and row["also"]["f1"]["mean"] == pytest.approx(87.5)
    assert row["published"][0]["metric"] == "em" and row["published"][0]["value"] == 65.30


# ---- 6. line order --------------------------------------------------------------------------------

def test_submit_checks_the_test_files_order(tmp_path):
    rows = _valid_rows(TASKS["afqmc"], FIX)
    rows[0], rows[1] = rows[1], rows[0]
    _write(tmp_path / "afqmc_predict.json", rows)
    _, problems = validate_and_zip(tmp_path, FIX)
    assert len(problems) == 1
    assert problems[0].startswith("afqmc_predict.json:1: id 1 where test.json has id 0 (record 1): predictions "
                                  "must follow the test file's order (2 line(s) out of order)")


def test_clue_official_layout_is_accepted(tmp_path):
    for name, task in _by_file(SUITES["clue1.1"]).items():
        _write(tmp_path / name, _valid_rows(task, FIX))
    zip_path, problems = validate_and_zip(tmp_path, FIX)
    assert problems == [] and sorted(zipfile.ZipFile(zip_path).namelist()) == sorted(OFFICIAL_CLUE)


# ---- 7. OCNLI file names --------------------------------------------------------------------------

def test_ocnli_reads_the_official_training_files():
    task = TASKS["ocnli"]
    state = classify.prepare(task, FIX / "ocnli")
    assert not (FIX / "ocnli" / "train.json").exists()
    assert len(classify.load(task, FIX / "ocnli" / "train.json", state, True)) == 6  # train.50k.json
    assert len(classify.load(task, FIX / "ocnli" / "train.10k.json", state, True)) == 3  # --set train_file=…


# ---- issue 8 item 10 ------------------------------------------------------------------------------

def test_kgclue_default_knowledge_base_is_train_only_and_recall_is_reported():
    task = TASKS["kgclue"]
    kb = kgclue.prepare(task, FIX / "kgclue")["kb"]
    assert {t[0] for t in kb.triples} == {"刘晓华（广东工业大学教授）", "巫山县疾病预防控制中心",
                                          "守望星光（韩玉玲、刘东考演唱歌曲）", "北京"}  # no dev answer
    gold = [("刘质平", "老师", "李叔同"), ("北京", "人口", "2154万")]
    ex = [{"gold": gold[0], "candidates": [("刘晓华", "主讲课程", "x")]}, {"gold": gold[1], "candidates": [gold[1]]}]
    s = kgclue.score(task, [("刘晓华", "主讲课程", "x"), gold[1]], ex)
    assert s["recall"] == 50 and s["em"] == 50


def test_report_labels_every_published_figure_with_its_method():
    from clueforge.tasks.suite import report_markdown, task_row

    rows = [task_row("fewclue-eprstmt", [{"accuracy": 60.0}], "fine-tuning"),
            task_row("kgclue", [{"score": 1.0, "em": 0.0, "f1": 2.0, "recall": 0.0}], "fine-tuning")]
    md = report_markdown({"suite": "s", "model": "m", "seeds": 1, "method": "fine-tuning", "tasks": rows,
                          "skipped": [], "average": 30.5})
    line = next(x for x in md.splitlines() if x.startswith("| fewclue-eprstmt |"))
    assert "| fine-tuning |" in line  # clueforge's own method
    assert "accuracy 61.9 (RoBERTa-wwm-ext · fine-tuning · FewCLUE test_public)" in line
    assert "accuracy 86.7 (RoBERTa-wwm-ext · PET · FewCLUE test_public)" in line
    assert line.index("61.9") < line.index("86.7")  # the like-for-like method first
    assert "score 83.9 (RoBERTa-wwm-ext 3L · KgCLUE baseline" in md and "recall 0.00" in md
    assert rows[0]["published"][1] == {"value": 86.7, "metric": "accuracy", "model": "RoBERTa-wwm-ext",
                                       "method": "PET", "split": "FewCLUE test_public"}


# ---- issue 9: submit reports, stale zip, missing folder; kb.tsv atomically ------------------------

def test_submit_reports_missing_suite_files_and_ignored_files(tmp_path):
    from clueforge.tasks.submit import submit

    _write(tmp_path / "afqmc_predict.json", _valid_rows(TASKS["afqmc"], FIX))
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / "old").mkdir()
    zip_path, check = submit(tmp_path, FIX)
    assert check.problems == []
    assert zipfile.ZipFile(zip_path).namelist() == ["afqmc_predict.json"]
    assert check.notes == [
        "incomplete CLUE 1.1 submission: 1/10 files; missing tnews11_predict.json, iflytek_predict.json, "
        "cmnli_predict.json, ocnli_50k_predict.json, cluewsc11_predict.json, csl_predict.json, "
        "cmrc2018_predict.json, chid11_predict.json, c311_predict.json",
        "ignored (not leaderboard files, left out of the zip): README.md, old/"]


def test_submit_removes_a_stale_zip_when_validation_fails(tmp_path):
    _write(tmp_path / "afqmc_predict.json", _valid_rows(TASKS["afqmc"], FIX))
    zip_path, problems = validate_and_zip(tmp_path, FIX)
    assert problems == [] and zip_path.is_file()
    _write(tmp_path / "afqmc_predict.json", [{"id": 0, "label": "yes"}])
    _, problems = validate_and_zip(tmp_path, FIX)
    assert problems and not zip_path.exists()


def test_cli_submit_on_a_missing_folder_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from clueforge.cli import app

    res = CliRunner().invoke(app, ["submit", str(tmp_path / "nope"), "--data", str(FIX)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    out = " ".join(res.output.split())
    assert "error:" in out and "nope: no such folder of predictions" in out


def test_kb_tsv_is_written_atomically(tmp_path, monkeypatch):
    import os

    kb = kgclue.KnowledgeBase([("北京", "人口", "2154万")])
    path = tmp_path / "kb.tsv"
    path.write_text("old\tkb\tfile\n", encoding="utf-8")

    def crash(*a, **k):  # the process dies before the rename
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        kb.save(path)
    assert path.read_text(encoding="utf-8") == "old\tkb\tfile\n"  # the old file, whole


# ---- issue 10 audit -------------------------------------------------------------------------------

def _fewclue_tnews_root(tmp_path: Path) -> Path:
    """A root holding only FewCLUE's TNEWS folder (its ``tnews/`` name is CLUE's too)."""
    root = tmp_path / "data"
    (root / "tnews").mkdir(parents=True)
    for f in ("test.json", "train_0.json", "dev_0.json"):
        (root / "tnews" / f).write_text((LB / "fewclue" / "tnews" / "test.json").read_text(encoding="utf-8"),
                                        encoding="utf-8")
    return root


def test_clue_file_is_never_checked_against_fewclue_test_data(tmp_path):
    root = _fewclue_tnews_root(tmp_path)
    sub = tmp_path / "sub"
    _write(sub / "tnews11_predict.json", _valid_rows(TASKS["fewclue-tnews"], root))
    assert task_dir(root, TASKS["tnews"]) is None and task_dir(root, TASKS["fewclue-tnews"]) == root / "tnews"
    _, problems = validate_and_zip(sub, root)
    assert problems == [f"tnews11_predict.json: no test data for tnews under {root}: {root / 'tnews'} holds FewCLUE "
                        f"data (train_0.json / dev_0.json, or a fewclue/ folder), not CLUE's; put CLUE's release "
                        f"folder tnews_public/ (or tnews/) under the root"]
    assert not (sub / "submission.zip").exists()
    # FewCLUE's layout without the split files (a test-only fewclue/ folder) is refused as well
    assert task_dir(LB / "fewclue", TASKS["tnews"]) is None
    assert task_dir(LB / "fewclue" / "tnews", TASKS["tnews"]) is None
    assert task_dir(LB / "fewclue", TASKS["fewclue-tnews"]) == LB / "fewclue" / "tnews"


def test_clue_release_folder_is_found_before_a_fewclue_folder(tmp_path):
    root = _fewclue_tnews_root(tmp_path)
    (root / "tnews_public").mkdir()
    (root / "tnews_public" / "test.json").write_text((FIX / "tnews" / "test.json").read_text(encoding="utf-8"),
                                                     encoding="utf-8")
    assert task_dir(root, TASKS["tnews"]) == root / "tnews_public"
    sub = tmp_path / "sub"
    _write(sub / "tnews11_predict.json", _valid_rows(TASKS["tnews"], FIX))
    _, problems = validate_and_zip(sub, root)
    assert problems == []


@pytest.mark.parametrize("wrong,expected", [("iflytek_predict_all.json", ["iflytekf_predict_all.json"]),
                                            ("csl_predict_0.json", ["cslf_predict_0.json", "csldcp_predict_0.json"]),
                                            ("tnews_predict_3.json", ["tnewsf_predict_3.json"]),
                                            ("afqmc_predict_0.json", ["afqmc_predict.json"])])
def test_five_split_suffix_suggests_fewclue_names_only(tmp_path, wrong, expected):
    _write(tmp_path / wrong, [{"id": 0, "label": "1"}])
    _, problems = validate_and_zip(tmp_path, LB)
    assert problems == [f"{wrong}: not a leaderboard file name; expected {' or '.join(expected)}"]


def test_stale_zip_is_removed_when_the_check_cannot_run(tmp_path):
    from typer.testing import CliRunner

    from clueforge.cli import app

    _write(tmp_path / "afqmc_predict.json", _valid_rows(TASKS["afqmc"], FIX))
    zip_path, problems = validate_and_zip(tmp_path, FIX)
    assert problems == [] and zip_path.is_file()
    res = CliRunner().invoke(app, ["submit", str(tmp_path), "--data", str(tmp_path / "no-such-root")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not zip_path.exists()
    assert "removed the stale" in " ".join(res.output.split())


def test_files_of_different_leaderboards_are_not_zipped_together(tmp_path):
    _write(tmp_path / "afqmc_predict.json", _valid_rows(TASKS["afqmc"], FIX))
    _write(tmp_path / "eprstmt_predict.json", _valid_rows(TASKS["fewclue-eprstmt"], LB))
    _write(tmp_path / "eprstmt_predict_0.json", _valid_rows(TASKS["fewclue-eprstmt"], LB))
    (tmp_path / "submission.zip").write_text("stale")
    _, problems = validate_and_zip(tmp_path, FIX)
    mixed = [p for p in problems if p.startswith("files of several leaderboards")]
    assert mixed == ["files of several leaderboards in one folder; zip each board's files on their own: "
                     "CLUE 1.1: afqmc_predict.json; FewCLUE: eprstmt_predict.json; "
                     "FewCLUE five-split: eprstmt_predict_0.json"]
    assert not (tmp_path / "submission.zip").exists()


def test_kgclue_scores_the_tail_only():
    """Official evaluate_f1_em.py: Score = 0.5·EM_O + 0.5·F1_O — head and relation are not scored."""
    task = TASKS["kgclue"]
    gold = ("刘晓华（广东工业大学教授）", "主讲课程", "《固体物理》")
    ex = [{"gold": gold, "candidates": [gold]}]
    s = kgclue.score(task, [("刘晓华", "教授课程", "《固体物理》")], ex)
    assert s["em"] == 100 and s["f1"] == 100 and s["score"] == 100
    s = kgclue.score(task, [gold[:2] + ("固体物理",)], ex)  # same head and relation, other tail
    assert s["em"] == 0 and s["f1"] == pytest.approx(100 * 2 * 4 / (4 + 6))


# CMRC2018 F1 by hand with the official mixed_segmentation: punctuation of its list dropped without
# ending the run, a CJK character per token, every other run nltk.word_tokenize'd.
@pytest.mark.parametrize("pred,answers,tokens,f1", [
    ("10km", ["约10km"], ["10km"], 2 * 1 * 0.5 / 1.5),  # ['10km'] vs ['约', '10km']
    ("50％", ["约50％"], ["50％"], 2 * 1 * 0.5 / 1.5),
    ("2cm（0.79", ["2cm0.79英寸"], ["2cm0.79"], 2 * 1 * (1 / 3) / (4 / 3)),  # （ dropped inside the run
    ("don't know", ["i don't know"], ["do", "n't", "know"], 2 * 1 * 0.75 / 1.75),
    ("hello, world", ["hello world"], ["hello", ",", "world"], 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)),
])
def test_cmrc_f1_uses_the_official_segmentation(pred, answers, tokens, f1):
    from clueforge.tasks.metrics import _cmrc_segment, cmrc_f1

    assert _cmrc_segment(pred) == tokens
    assert cmrc_f1(pred, answers) == pytest.approx(f1)
