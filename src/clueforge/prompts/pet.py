"""PET: fine-tuning through the MLM head with a template and verbalizer (Schick & Schütze 2021).

    clueforge finetune fewclue-eprstmt --method pet --data ../shared/data/tasks/fewclue/eprstmt \\
        --model runs/mini/final --out runs/pet/eprstmt [--set template=after] [--set prompts=my.yaml]
        [--set template=all]                       # one model on every template, ensembled
        [--set pet_mlm=0.1 --set unlabeled_file=test.json]   # PET's auxiliary MLM loss

``PetFamily`` wraps a task's family for the fine-tuning loop: the base family loads, decodes,
scores and writes submissions unchanged; encoding puts each example into each template (one row per
label-word length and template, as ``prompts.score``); ``PromptModel`` is the pretrained
``BertForMLM`` whose forward turns those rows into (B, C) label log-probabilities: per template the
mean (or sum) log-probability of each label's word at its [MASK]s, normalised over the labels, then
averaged over the templates (``template=all``: an ensemble of every template of the task, trained
as one model; one template: the log-softmax of its scores, so the loss and the argmax are PET's).
The loss is cross-entropy over them, plus ``pet_mlm`` × the masked-LM loss on unlabeled text run
through the first template (15 % of its tokens masked at collate time, one unlabeled row per labelled
example), as PET does against catastrophic forgetting. The checkpoint is a plain masked-LM
directory whose ``clueforge_task`` entry keeps the templates and verbalizers, so ``predict`` (and
``zeroshot``) need nothing else. Tasks that score per-example candidates (CHID) have no fixed
verbalizer for the model to hold and are refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.prompts.score import PromptEncoder, example_rows, slots_of
from clueforge.prompts.spec import Template, check_for_task, pick, templates_for
from clueforge.tasks import choice
from clueforge.tasks.registry import Task

MLM_RATIO = 0.15
"""Share of an unlabeled row's tokens masked for the auxiliary MLM loss."""


class PromptModel(BertForMLM):
    """``BertForMLM`` + fixed verbalizers: (B, R, T) prompt rows → (B, C) label log-probabilities,
    the mean over templates of each template's log-softmax over its label scores."""

    def __init__(self, cfg: ModelConfig, words: list[list[list[int]]], mask_id: int, scores: list[str]):
        """``words[k][c]``: template k's word for label c as token ids; ``scores[k]``: mean or sum."""
        super().__init__(cfg)
        L = max(len(w) for ws in words for w in ws)
        ids, lens, rows, offset = [], [], [], 0
        for ws in words:  # template k owns one row per distinct word length, in increasing length
            lengths = sorted({len(w) for w in ws})
            ids.append([w + [0] * (L - len(w)) for w in ws])
            lens.append([len(w) for w in ws])
            rows.append([offset + lengths.index(len(w)) for w in ws])
            offset += len(lengths)
        self.mask_id = mask_id
        self.register_buffer("word_ids", torch.tensor(ids), persistent=False)  # (K, C, L)
        self.register_buffer("word_len", torch.tensor(lens), persistent=False)  # (K, C)
        self.register_buffer("word_row", torch.tensor(rows), persistent=False)  # (K, C)
        self.register_buffer("is_mean", torch.tensor([s == "mean" for s in scores]), persistent=False)  # (K,)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # type: ignore[override]
        B, R, T = input_ids.shape
        flat = lambda x: None if x is None else x.reshape(B * R, T)  # noqa: E731
        h = self.encoder(flat(input_ids), flat(attention_mask), flat(token_type_ids))  # (B·R, T, D)
        first = (flat(input_ids) == self.mask_id).int().argmax(-1)  # (B·R,) each row's first [MASK]
        L = self.word_ids.shape[-1]
        pos = (first[:, None] + torch.arange(L, device=h.device)).clamp(max=T - 1)  # (B·R, L)
        h = h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))  # (B·R, L, D)
        logp = F.log_softmax(self.head(h).float(), -1).view(B, R, L, -1)  # (B, R, L, V)
        j = torch.arange(L, device=h.device)
        tok_lp = logp[:, self.word_row[..., None], j, self.word_ids]  # (B, K, C, L)
        valid = (j < self.word_len[..., None]).float()  # (K, C, L)
        total = (tok_lp * valid).sum(-1)  # (B, K, C)
        total = torch.where(self.is_mean[:, None], total / self.word_len, total)
        return F.log_softmax(total, -1).mean(1)  # (B, C)


class PetFamily:
    """A task family seen through prompts (the loop's family contract; see ``finetune.loop``)."""

    HEAD = "prompt"

    def __init__(self, base, templates: list[Template] | None = None, template_name: str | None = None,
                 prompts: str | None = None, mlm_weight: float = 0.0, unlabeled_file: str | None = None,
                 seed: int = 0):
        self.base, self.templates, self.template_name, self.prompts = base, templates, template_name, prompts
        self.mlm_weight, self.unlabeled_file = mlm_weight, unlabeled_file
        self.load, self.decode, self.score, self.submission = base.load, base.decode, base.score, base.submission
        self.rng = np.random.default_rng(seed)
        self.unlabeled: list[list[int]] = []  # token ids of the unlabeled rows (auxiliary MLM)
        self.special: tuple[int, ...] = ()

    def _checked(self, task: Task, labels) -> list[Template]:
        found = self.templates or templates_for(task, self.prompts)
        chosen = found if self.template_name == "all" and not self.templates else (
            self.templates or [pick(found, self.template_name)])
        for t in chosen:
            check_for_task(t, task, labels)
        return chosen

    def prepare(self, task: Task, data: Path, cfg=None) -> dict:
        if task.family != "classify":
            raise ValueError(f"--method pet needs a fixed verbalizer: {task.name} ({task.family}) scores "
                             f"per-example candidates; use `clueforge zeroshot` or plain fine-tuning")
        state = self.base.prepare(task, data, cfg)
        state["templates"] = self._checked(task, state["labels"])
        if self.mlm_weight:  # the unlabeled text of the auxiliary MLM loss (default: the training inputs)
            name = self.unlabeled_file or (cfg.train_file if cfg and cfg.train_file else task.files["train"])
            state["unlabeled"] = [slots_of(task, e) for n in name.split(",")
                                  for e in self.base.load(task, Path(data) / n, state, False)]
        return state

    def state_to_json(self, state: dict) -> dict:
        return {**self.base.state_to_json(state), "method": "pet",
                "prompts": [{"name": t.name, "pattern": t.pattern, "verbalizer": t.verbalizer, "score": t.score}
                            for t in state["templates"]]}

    @staticmethod
    def from_meta(base, meta: dict, model_dir: Path) -> tuple["PetFamily", dict]:
        listed = meta["prompts"] if "prompts" in meta else [meta["prompt"]]
        templates = [Template(p["name"], p["pattern"], p["verbalizer"], p.get("score", "mean"),
                              f"{model_dir}/config.json: prompts.{p['name']}") for p in listed]
        state = base.state_from_json(meta, model_dir)
        state["templates"] = templates
        return PetFamily(base, templates=templates), state

    def encode(self, task: Task, examples: list[dict], tok, max_length: int, state: dict, training: bool = False):
        index = {lab: i for i, lab in enumerate(state["labels"])}
        per_template = []
        for t in state["templates"]:
            enc = PromptEncoder(tok, t, max_length)
            words = [t.verbalizer[lab] for lab in state["labels"]]
            unk = [w for w in words if enc.unk_id in enc.word_ids(w)]
            if unk:
                raise ValueError(f"{t.source}.verbalizer: word(s) {', '.join(unk[:5])} not in the model's vocabulary")
            rows, _, _ = example_rows(enc, [slots_of(task, e) for e in examples], [words] * len(examples))
            per_template.append((rows, len(rows) // max(1, len(examples))))
        if training and self.mlm_weight and state.get("unlabeled"):
            enc = PromptEncoder(tok, state["templates"][0], max_length)
            self.unlabeled = [ids for ids, _ in enc.rows(state["unlabeled"], [1] * len(state["unlabeled"]))]
            self.special = (enc.cls_id, enc.sep_id, enc.mask_id, tok.token_to_id("[PAD]"))
            self.mask_id = enc.mask_id
        return [{"rows": [(ids, [0] * len(ids)) for rows, R in per_template for ids, _ in rows[i * R:(i + 1) * R]],
                 "example": i, "training": training,
                 "label": index[e["label"]] if e.get("label") not in (None, "-") else -100}
                for i, e in enumerate(examples)]

    def collate(self, features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """The prompt rows (B, R, T); training batches also carry one masked unlabeled row per example."""
        batch = choice.collate(features, pad_id)
        if self.unlabeled and features and features[0]["training"]:
            picked = [self.unlabeled[i] for i in self.rng.integers(len(self.unlabeled), size=len(features))]
            T = max(map(len, picked))
            ids = np.full((len(picked), T), pad_id, dtype=np.int64)
            for r, p in enumerate(picked):
                ids[r, :len(p)] = p
            can = ~np.isin(ids, self.special)  # (B, T) text tokens only
            sel = can & (self.rng.random(ids.shape) < MLM_RATIO)
            empty = ~sel.any(1) & can.any(1)  # every row predicts at least one token
            for r in np.nonzero(empty)[0]:
                sel[r, self.rng.choice(np.nonzero(can[r])[0])] = True
            batch["mlm_input_ids"] = torch.from_numpy(np.where(sel, self.mask_id, ids))
            batch["mlm_attention_mask"] = torch.from_numpy((ids != pad_id).astype(np.int64))
            batch["mlm_labels"] = torch.from_numpy(np.where(sel, ids, -100))
        return batch

    @staticmethod
    def loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"], ignore_index=-100)

    def aux_loss(self, model: PromptModel, batch: dict) -> tuple[torch.Tensor | None, dict]:
        """``pet_mlm`` × the masked-LM loss of the batch's unlabeled rows (none: ``None``)."""
        if "mlm_input_ids" not in batch or not self.mlm_weight:
            return None, {}
        mlm = BertForMLM.forward(model, batch["mlm_input_ids"], batch["mlm_attention_mask"],
                                 labels=batch["mlm_labels"]).loss
        return self.mlm_weight * mlm, {"mlm_loss": mlm.item()}

    def load_model(self, model_dir: Path, state: dict, tok) -> PromptModel:
        from clueforge.model.hf import from_hf_state_dict, read_hf_config, read_hf_weights

        cfg, _ = read_hf_config(model_dir)
        words = [[tok.encode(t.verbalizer[lab], add_special_tokens=False).ids for lab in state["labels"]]
                 for t in state["templates"]]
        model = self.build_model(cfg, words, tok, [t.score for t in state["templates"]], state)
        absent = from_hf_state_dict(model, read_hf_weights(Path(model_dir)))
        if absent:
            raise ValueError(f"{model_dir}: no masked-LM head (lacks {', '.join(absent)}): PET needs one")
        return model

    def build_model(self, cfg: ModelConfig, words: list[list[list[int]]], tok, scores: list[str],
                    state: dict) -> PromptModel:
        """The model ``load_model`` fills with the checkpoint's weights (P-tuning's adds its prompt)."""
        return PromptModel(cfg, words, tok.token_to_id("[MASK]"), scores)
