"""EFL: every task as entailment against a label description (Wang et al. 2021, "Entailment as
Few-Shot Learner").

    clueforge finetune fewclue-tnews --method efl --data ../shared/data/tasks/fewclue/tnews \\
        --model runs/mini/final --out runs/efl/tnews [--set template=about] [--set prompts=my.yaml]

The label description is the task's prompt with the label's word written in place of ``[MASK]``:
an example becomes one statement per label (EPRSTMT "很满意。{sentence}", "不满意。{sentence}"),
each scored by one logit of a new sentence head on ``[CLS]`` (the multiple-choice head of
``tasks.choice``: (B, C, T) → (B, C)); training is cross-entropy over the labels' statements, so
the head learns "is this statement true" and a label it has seen few examples of is still a
sentence the encoder reads. Unlike PET it needs no word per label that the MLM head can predict
(a description may be a phrase of any length) and no MLM head at all, but it costs one row per
label and example (IFLYTEK: 119). The EFL paper starts from a model fine-tuned on NLI; here any
checkpoint is the start (an OCNLI/CMNLI fine-tune is the closest to the paper). The checkpoint keeps
the template, so ``predict`` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path

from clueforge.prompts.score import PromptEncoder, slots_of
from clueforge.prompts.spec import Template, check_for_task, pick, templates_for
from clueforge.tasks import choice
from clueforge.tasks.registry import Task


def statements(enc: PromptEncoder, slot_values: list[dict[str, str]], words: list[str]) -> list[list[list[int]]]:
    """Per example, one row per word: the template with its slots filled and the word in the blank."""
    word_ids = [enc.word_ids(w) for w in words]
    rows = enc.rows([s for s in slot_values for _ in words], [len(w) for _ in slot_values for w in word_ids])
    out = []
    for e in range(len(slot_values)):
        mine = []
        for c, w in enumerate(word_ids):
            ids, start = rows[e * len(words) + c]
            mine.append(ids[:start] + w + ids[start + len(w):])
        out.append(mine)
    return out


class EflFamily:
    """A classification family as multiple choice over its labels' statements (the loop's family
    contract; the model is ``TaskModel`` with the ``choice`` head)."""

    HEAD = "choice"

    def __init__(self, base, template: Template | None = None, template_name: str | None = None,
                 prompts: str | None = None):
        self.base, self.template, self.template_name, self.prompts = base, template, template_name, prompts
        self.load, self.decode, self.score, self.submission = base.load, base.decode, base.score, base.submission
        self.collate, self.loss = choice.collate, choice.loss

    def prepare(self, task: Task, data: Path, cfg=None) -> dict:
        if task.family != "classify":
            raise ValueError(f"--method efl needs a fixed label set: {task.name} ({task.family}) scores "
                             f"per-example candidates; use plain fine-tuning")
        state = self.base.prepare(task, data, cfg)
        t = self.template or pick(templates_for(task, self.prompts), self.template_name)
        check_for_task(t, task, state["labels"])
        state["templates"] = [t]
        return state

    def state_to_json(self, state: dict) -> dict:
        t = state["templates"][0]
        return {**self.base.state_to_json(state), "method": "efl",
                "prompts": [{"name": t.name, "pattern": t.pattern, "verbalizer": t.verbalizer, "score": t.score}]}

    @staticmethod
    def from_meta(base, meta: dict, model_dir: Path) -> tuple["EflFamily", dict]:
        (p,) = meta["prompts"]
        t = Template(p["name"], p["pattern"], p["verbalizer"], p.get("score", "mean"),
                     f"{model_dir}/config.json: prompts.{p['name']}")
        state = base.state_from_json(meta, model_dir)
        state["templates"] = [t]
        return EflFamily(base, template=t), state

    def encode(self, task: Task, examples: list[dict], tok, max_length: int, state: dict, training: bool = False):
        t = state["templates"][0]
        enc = PromptEncoder(tok, t, max_length)
        words = [t.verbalizer[lab] for lab in state["labels"]]
        index = {lab: i for i, lab in enumerate(state["labels"])}
        rows = statements(enc, [slots_of(task, e) for e in examples], words)
        return [{"rows": [(ids, [0] * len(ids)) for ids in r], "example": i,
                 "label": index[e["label"]] if e.get("label") not in (None, "-") else -100}
                for i, (e, r) in enumerate(zip(examples, rows))]
