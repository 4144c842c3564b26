"""PET: fine-tuning through the MLM head with a template and verbalizer (Schick & Schütze 2021).

    clueforge finetune fewclue-eprstmt --method pet --data ../shared/data/tasks/fewclue/eprstmt \\
        --model runs/mini/final --out runs/pet/eprstmt [--set template=after] [--set prompts=my.yaml]

``PetFamily`` wraps a task's family for the fine-tuning loop: the base family loads, decodes,
scores and writes submissions unchanged; encoding puts each example into the template (one row per
label-word length, as ``prompts.score``); ``PromptModel`` is the pretrained ``BertForMLM`` whose
forward turns those rows into (B, C) label scores, the mean (or sum) log-probability of each
label's word at its [MASK]s; the loss is cross-entropy over them. The checkpoint is a plain
masked-LM directory whose ``clueforge_task`` entry keeps the template and verbalizer, so
``predict`` (and ``zeroshot``) need nothing else. Tasks that score per-example candidates (CHID)
have no fixed verbalizer for the model to hold and are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.prompts.score import PromptEncoder, example_rows, slots_of
from clueforge.prompts.spec import Template, check_for_task, pick, templates_for
from clueforge.tasks import choice
from clueforge.tasks.registry import Task


class PromptModel(BertForMLM):
    """``BertForMLM`` + a fixed verbalizer: (B, R, T) prompt rows → (B, C) label scores."""

    def __init__(self, cfg: ModelConfig, words: list[list[int]], mask_id: int, score: str = "mean"):
        super().__init__(cfg)
        lengths = sorted({len(w) for w in words})
        L = max(lengths)
        self.mask_id, self.mean = mask_id, score == "mean"
        self.register_buffer("word_ids", torch.tensor([w + [0] * (L - len(w)) for w in words]), persistent=False)  # (C, L)
        self.register_buffer("word_len", torch.tensor([len(w) for w in words]), persistent=False)  # (C,)
        self.register_buffer("word_row", torch.tensor([lengths.index(len(w)) for w in words]), persistent=False)  # (C,)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # type: ignore[override]
        B, R, T = input_ids.shape
        flat = lambda x: None if x is None else x.reshape(B * R, T)  # noqa: E731
        h = self.encoder(flat(input_ids), flat(attention_mask), flat(token_type_ids))  # (B·R, T, D)
        first = (flat(input_ids) == self.mask_id).int().argmax(-1)  # (B·R,) each row's first [MASK]
        L = self.word_ids.shape[1]
        pos = (first[:, None] + torch.arange(L, device=h.device)).clamp(max=T - 1)  # (B·R, L)
        h = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))  # (B·R, L, D)
        logp = F.log_softmax(self.head(h).float(), -1).view(B, R, L, -1)  # (B, R, L, V)
        j = torch.arange(L, device=h.device)
        tok_lp = logp[:, self.word_row[:, None], j[None, :], self.word_ids]  # (B, C, L)
        valid = (j[None, :] < self.word_len[:, None]).float()  # (C, L)
        total = (tok_lp * valid).sum(-1)  # (B, C)
        return total / self.word_len if self.mean else total


class PetFamily:
    """A task family seen through a prompt (the loop's family contract; see ``finetune.loop``)."""

    HEAD = "prompt"

    def __init__(self, base, template: Template | None = None, template_name: str | None = None,
                 prompts: str | None = None):
        self.base, self.template, self.template_name, self.prompts = base, template, template_name, prompts
        self.load, self.decode, self.score, self.submission = base.load, base.decode, base.score, base.submission
        self.collate = choice.collate  # (B, R, T) rows, padded

    def _checked(self, task: Task, labels) -> Template:
        t = self.template or pick(templates_for(task, self.prompts), self.template_name)
        check_for_task(t, task, labels)
        return t

    def prepare(self, task: Task, data: Path, cfg=None) -> dict:
        if task.family != "classify":
            raise ValueError(f"--method pet needs a fixed verbalizer: {task.name} ({task.family}) scores "
                             f"per-example candidates; use `clueforge zeroshot` or plain fine-tuning")
        state = self.base.prepare(task, data, cfg)
        state["template"] = self._checked(task, state["labels"])
        return state

    def state_to_json(self, state: dict) -> dict:
        t = state["template"]
        return {**self.base.state_to_json(state), "method": "pet",
                "prompt": {"name": t.name, "pattern": t.pattern, "verbalizer": t.verbalizer, "score": t.score}}

    @staticmethod
    def from_meta(base, meta: dict, model_dir: Path) -> tuple["PetFamily", dict]:
        p = meta["prompt"]
        t = Template(p["name"], p["pattern"], p["verbalizer"], p.get("score", "mean"), f"{model_dir}/config.json: prompt")
        fam = PetFamily(base, template=t)
        state = base.state_from_json(meta, model_dir)
        state["template"] = t
        return fam, state

    def encode(self, task: Task, examples: list[dict], tok, max_length: int, state: dict, training: bool = False):
        t = state["template"]
        enc = PromptEncoder(tok, t, max_length)
        words = [t.verbalizer[lab] for lab in state["labels"]]
        unk = [w for w in words if enc.unk_id in enc.word_ids(w)]
        if unk:
            raise ValueError(f"{t.source}.verbalizer: word(s) {', '.join(unk[:5])} not in the model's vocabulary")
        rows, _, _ = example_rows(enc, [slots_of(task, e) for e in examples], [words] * len(examples))
        R = len(rows) // max(1, len(examples))
        index = {lab: i for i, lab in enumerate(state["labels"])}
        return [{"rows": [(ids, [0] * len(ids)) for ids, _ in rows[i * R:(i + 1) * R]], "example": i,
                 "label": index[e["label"]] if e.get("label") not in (None, "-") else -100}
                for i, e in enumerate(examples)]

    @staticmethod
    def loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"], ignore_index=-100)

    def load_model(self, model_dir: Path, state: dict, tok) -> PromptModel:
        from clueforge.model.hf import from_hf_state_dict, read_hf_config, read_hf_weights

        t = state["template"]
        cfg, _ = read_hf_config(model_dir)
        words = [tok.encode(t.verbalizer[lab], add_special_tokens=False).ids for lab in state["labels"]]
        model = PromptModel(cfg, words, tok.token_to_id("[MASK]"), t.score)
        absent = from_hf_state_dict(model, read_hf_weights(Path(model_dir)))
        if absent:
            raise ValueError(f"{model_dir}: no masked-LM head (lacks {', '.join(absent)}): PET needs one")
        return model
