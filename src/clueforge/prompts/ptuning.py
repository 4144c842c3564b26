"""P-tuning: PET with trainable continuous prompt vectors (Liu et al. 2021, "GPT Understands, Too").

    clueforge finetune fewclue-eprstmt --method ptuning --data ../shared/data/tasks/fewclue/eprstmt \\
        --model runs/mini/final --out runs/ptuning/eprstmt [--set ptuning_tokens=4]
        [--set ptuning_encoder=lstm|mlp|none] [--set ptuning_freeze=true --set lr=3e-4]

Design:
- Everything of PET is reused (``prompts.pet``): the shipped template and verbalizer, one row per
  label-word length with one [MASK] per token, ``PromptModel``'s (B, C) label log-probabilities and
  PET's cross-entropy through the MLM head, ``predict``/``submit`` unchanged.
- ``ptuning_tokens`` = k pseudo tokens are appended to every row **right before its final
  [SEP]** (EPRSTMT "[MASK]满意。{sentence}" → ``[CLS] [MASK] 满 意 。 sentence P1…Pk [SEP]``): PET's
  row stays whole and at PET's positions, so the template's words and [MASK] keep the prior PET
  reuses, and the k vectors (attended to by every token, the [MASK]s included) learn what the
  hand-written template does not say. Placed elsewhere they displace it. On the synthetic test's
  MLM (trained on short rows only), k = 4 vectors between the template's text and its [MASK] end 2
  epochs at 52 %; as a prefix after [CLS] (every template token shifted by 4) the untrained start
  is 55 % and 2 epochs keep it there; appended they start at 80 % and reach 100 % in 4 epochs (chance
  50 %, PET 100 %). The slots are cut by k tokens more to keep ``max_length``. A
  pseudo token's input id is ``[UNK]`` (never looked at): inside ``PtuningModel.forward`` the word
  embeddings at the k positions before each row's last [SEP] are replaced by the prompt vectors (a
  forward hook on the word embedding, removed when the forward ends), so position and token-type
  embeddings and the embedding LayerNorm apply to them as to words.
- The k vectors come from a prompt encoder (``ptuning_encoder``): ``lstm`` (the paper's: k input
  vectors → a 2-layer BiLSTM with D/2 units each way → Linear-ReLU-Linear), ``mlp`` (input vectors
  → Linear-ReLU-Linear) or ``none`` (the input vectors themselves, as the bert4keras/FewCLUE
  Keras P-tuning trains the rows of unused tokens). Input vectors start as N(0, σ²) with σ the
  standard deviation of the model's word embeddings; the encoder layers keep PyTorch's default
  initialisation.
- ``ptuning_freeze``: only the prompt encoder trains; the encoder body and MLM head stay bit-identical
  (P-tuning's frozen-LM setting; the default tunes everything, as the paper's few-shot SuperGLUE
  runs do). Frozen, ``lr`` is the prompt encoder's rate: give a larger one (1e-4 to 1e-3).
- k = 0 is PET exactly (no prompt module is built; the equivalence is tested). ``template=all``
  (PET's ensemble) and ``pet_mlm`` are refused: P-tuning learns one prompt.
- The checkpoint is PET's (the MLM weights, the template and verbalizer in ``config.json``) plus
  ``prompt.safetensors``: the k final prompt vectors (the encoder's output under the saved, EMA
  if on, weights; the BiLSTM/MLP are a training-time reparameterisation and are not kept) and the
  settings in ``clueforge_task.ptuning``; ``predict`` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clueforge.model.bert import ModelConfig
from clueforge.prompts.pet import PetFamily, PromptModel
from clueforge.tasks.registry import Task

ENCODERS = ("lstm", "mlp", "none")
PROMPT_FILE = "prompt.safetensors"


class ContinuousPrompt(nn.Module):
    """k trainable input vectors → the (k, D) prompt vectors, through the chosen encoder."""

    def __init__(self, k: int, dim: int, kind: str):
        super().__init__()
        if kind not in ENCODERS:
            raise ValueError(f"prompt encoder {kind!r}: expected one of {', '.join(ENCODERS)}")
        if kind == "lstm" and dim % 2:
            raise ValueError(f"the lstm prompt encoder needs an even hidden size (two directions of D/2), not {dim}")
        self.kind = kind
        self.embedding = nn.Parameter(torch.zeros(k, dim))  # (k, D)
        self.lstm = nn.LSTM(dim, dim // 2, num_layers=2, bidirectional=True, batch_first=True) if kind == "lstm" else None
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) if kind != "none" else None

    def forward(self) -> torch.Tensor:
        x = self.embedding  # (k, D)
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]  # (k, D): both directions concatenated
        return x if self.mlp is None else self.mlp(x)  # (k, D)


class PtuningModel(PromptModel):
    """``PromptModel`` whose rows carry k pseudo tokens right before their last [SEP], embedded as
    the prompt encoder's vectors (k = 0: ``PromptModel`` itself)."""

    def __init__(self, cfg: ModelConfig, words: list[list[list[int]]], mask_id: int, scores: list[str],
                 n_tokens: int, kind: str, sep_id: int):
        super().__init__(cfg, words, mask_id, scores)
        self.n_tokens = n_tokens
        self.prompt = ContinuousPrompt(n_tokens, cfg.hidden_size, kind) if n_tokens else None
        self.sep_id = sep_id

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # type: ignore[override]
        if self.prompt is None:
            return super().forward(input_ids, attention_mask, token_type_ids)
        vectors = self.prompt()  # (k, D)
        k = self.n_tokens

        def insert(module, args, out):  # out (N, T, D): the word embeddings of the flattened rows
            ids = args[0]  # (N, T)
            T = ids.shape[1]
            sep = T - 1 - (ids.flip(1) == self.sep_id).int().argmax(-1)  # (N,) each row's last [SEP]
            pos = (sep[:, None] - k + torch.arange(k, device=out.device)).clamp(min=0)  # (N, k)
            src = vectors.to(out.dtype).expand(out.shape[0], -1, -1)  # (N, k, D)
            return out.scatter(1, pos[..., None].expand(-1, -1, out.shape[-1]), src)  # (N, T, D)

        handle = self.encoder.embeddings.word.register_forward_hook(insert)
        try:
            return super().forward(input_ids, attention_mask, token_type_ids)
        finally:
            handle.remove()

    def freeze_body(self) -> None:
        """Train only the prompt encoder: every other parameter stops taking gradients."""
        for name, p in self.named_parameters():
            if not name.startswith("prompt."):
                p.requires_grad_(False)


class PtuningFamily(PetFamily):
    """PET's family with the pseudo tokens written into each row and the prompt vectors saved with
    the checkpoint (the loop's family contract; see ``finetune.loop``)."""

    def __init__(self, base, n_tokens: int = 4, kind: str = "lstm", freeze: bool = False, **pet):
        super().__init__(base, **pet)
        self.settings = {"tokens": n_tokens, "encoder": kind, "freeze": freeze}
        self.model: PtuningModel | None = None  # the model whose prompt ``save_state_files`` writes

    def prepare(self, task: Task, data: Path, cfg=None) -> dict:
        state = super().prepare(task, data, cfg)
        state["ptuning"] = dict(self.settings)
        return state

    def state_to_json(self, state: dict) -> dict:
        return {**super().state_to_json(state), "method": "ptuning", "ptuning": {**state["ptuning"], "file": PROMPT_FILE}}

    @staticmethod
    def from_meta(base, meta: dict, model_dir: Path) -> tuple["PtuningFamily", dict]:
        pet, state = PetFamily.from_meta(base, meta, model_dir)
        s = meta["ptuning"]
        state["ptuning"] = {"tokens": s["tokens"], "encoder": s["encoder"], "freeze": s["freeze"]}
        state["prompt_file"] = Path(model_dir) / s["file"]
        return PtuningFamily(base, s["tokens"], s["encoder"], s["freeze"], templates=pet.templates), state

    def encode(self, task: Task, examples: list[dict], tok, max_length: int, state: dict, training: bool = False):
        """PET's rows (slots cut to leave room) with k ``[UNK]`` placeholders before the final [SEP]."""
        k = state["ptuning"]["tokens"]
        feats = super().encode(task, examples, tok, max_length - k, state, training)
        if k:
            unk = tok.token_to_id("[UNK]")
            for f in feats:
                f["rows"] = [(ids[:-1] + [unk] * k + ids[-1:], [0] * (len(ids) + k)) for ids, _ in f["rows"]]
        longest = max((len(ids) for f in feats for ids, _ in f["rows"]), default=0)
        if longest > max_length:  # the template, its [MASK]s and the pseudo tokens alone do not fit
            raise ValueError(f"ptuning_tokens={k}: rows of {longest} tokens exceed max_length {max_length} "
                             f"(the template's text and [MASK]s leave no room); use fewer tokens or a longer max_length")
        return feats

    def build_model(self, cfg: ModelConfig, words: list[list[list[int]]], tok, scores: list[str],
                    state: dict) -> PtuningModel:
        s = state["ptuning"]  # a P-tuning checkpoint's prompt is its saved vectors: a plain table
        return PtuningModel(cfg, words, tok.token_to_id("[MASK]"), scores, s["tokens"],
                            "none" if "prompt_file" in state else s["encoder"], tok.token_to_id("[SEP]"))

    def load_model(self, model_dir: Path, state: dict, tok) -> PtuningModel:
        model = super().load_model(model_dir, state, tok)
        if model.prompt is not None:
            with torch.no_grad():
                if "prompt_file" in state:
                    model.prompt.embedding.copy_(load_file(state["prompt_file"])["prompt"])
                else:
                    model.prompt.embedding.normal_(0.0, model.encoder.embeddings.word.weight.std().item())
        if state["ptuning"]["freeze"]:
            model.freeze_body()
        self.model = model
        return model

    def save_state_files(self, state: dict, out: Path) -> None:
        """``prompt.safetensors``: the (k, D) prompt vectors under the model's current weights."""
        model = self.model
        with torch.no_grad():
            vectors = model.prompt() if model.prompt is not None else torch.zeros(0, model.cfg.hidden_size)
        save_file({"prompt": vectors.float().contiguous().cpu()}, Path(out) / PROMPT_FILE, metadata={"format": "pt"})
