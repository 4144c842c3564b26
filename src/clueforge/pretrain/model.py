"""The model as pretraining sees it: the plain ``BertForMLM`` (encoder + tied MLM head) wrapped with
what only pretraining needs — auxiliary heads, layer taps, the objectives' own batches — and the
composition of every objective into one loss (``mlm_objective``).

The wrapped ``BertForMLM`` is what is exported (``save_hf``) and evaluated; the wrapper is what the
optimizer and data parallelism see, so every parameter a loss touches is in one forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clueforge.model.bert import BertForMLM
from clueforge.model.losses import symmetric_kl
from clueforge.pretrain import ar_mlm

MLM_AUX = ("triple_mlm",)  # auxiliary objectives predicted by the MLM head itself


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # the MLM loss of the main batch
    logits: torch.Tensor  # (M, V) at masked positions
    labels: torch.Tensor  # (M,) the targets matching ``logits`` rows
    hidden: torch.Tensor  # (B, T, D)
    layer_logits: list[torch.Tensor] | None = None  # (M, V) per tapped layer, at the same positions
    aux_logits: dict[str, torch.Tensor] | None = None  # objective → logits from its own batch


class PretrainingModel(nn.Module):
    """``BertForMLM`` + pretraining-only heads (``aux``: ``pretrain.objectives.AuxHeads`` or None)."""

    def __init__(self, mlm: BertForMLM, aux: nn.Module | None = None):
        super().__init__()
        self.mlm = mlm
        self.aux = aux

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        distill_layers: tuple[int, ...] = (),
        aux: dict[str, dict[str, torch.Tensor]] | None = None,
        ling: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """The MLM loss at labelled positions (-100 = not predicted) of the main batch; with
        ``distill_layers`` (1-based) also the MLM head's predictions from those layers; ``aux``
        maps an objective to its own batch, classified by ``self.aux`` (or, for ``MLM_AUX``,
        predicted by the MLM head); ``ling`` (B, T) the packed linguistic channel of the main batch
        (a model with ``linguistic_inputs``; the objectives' own batches carry none, so such a model
        refuses them)."""
        enc, head = self.mlm.encoder, self.mlm.head
        if aux and enc.cfg.linguistic_inputs:
            raise ValueError(f"structure/knowledge objectives {sorted(aux)} have no linguistic channel; a model "
                             f"with pos_embeddings or syntax_heads cannot train on them")
        if distill_layers:
            hidden, kept = enc(input_ids, attention_mask, token_type_ids, doc_ids, keep=distill_layers, ling=ling)
        else:
            hidden, kept = enc(input_ids, attention_mask, token_type_ids, doc_ids, ling=ling), []  # (B, T, D)
        sel = labels != -100  # (B, T)
        targets = labels[sel]  # (M,)
        logits = head(hidden[sel])  # (M, V)
        loss = F.cross_entropy(logits.float(), targets)
        layer_logits = [head(h[sel]) for h in kept] if kept else None
        aux_logits = {}
        for name, b in (aux or {}).items():
            h = enc(b["input_ids"], b["attention_mask"], b["token_type_ids"])  # (B', T', D)
            aux_logits[name] = head(h[b["labels"] != -100]) if name in MLM_AUX else self.aux(name, h)
        return PretrainOutput(loss, logits, targets, hidden, layer_logits, aux_logits)


def mlm_objective(model, batch: dict, t, layers: tuple[int, ...] | None = None) -> tuple:
    """The MLM loss plus the self-distillation and auxiliary terms the config turns on.

    ``model``: a ``PretrainingModel`` (possibly wrapped for data parallelism or compiled).
    ``layers``: the resolved 1-based layer taps (default: ``t.self_distill_layers`` as written).
    ``batch["ar_groups"]`` (``pretrain.ar_mlm``, present when ``t.ar_mlm_groups > 1``): the group of
    each predicted position; the groups run as k copies of the batch and ``mlm_loss`` is the mean
    of the groups' losses (``ar_group<j>_loss``).
    Returns ``(loss, output, parts)``; ``parts`` maps ``loss`` (the total) and each term's name
    (``mlm_loss``, ``sd_*``, ``<objective>_loss``) to its detached value.
    """
    layers = tuple(t.self_distill_layers or ()) if layers is None else tuple(layers)
    batch = dict(batch)
    batch_aux = batch.pop("aux", None)
    groups = batch.pop("ar_groups", None)  # (B, T) autoregressive MLM (train.ar_mlm_groups > 1), else absent
    if groups is not None:  # the k inputs of the groups as one batch of k·B rows (pretrain.ar_mlm)
        batch = ar_mlm.expand(batch, groups, t.ar_mlm_groups)
    if t.self_distill_instance:  # the batch twice in one forward: two dropout masks, one graph
        batch = {k: torch.cat([v, v]) for k, v in batch.items()}
    extra = {}
    if layers:
        extra["distill_layers"] = layers
    if batch_aux:
        extra["aux"] = batch_aux
    o = model(**batch, **extra)
    loss = o.loss  # with the doubled batch: the mean of both passes' MLM losses
    parts = {}
    if groups is not None:  # the mean over groups of each group's loss
        loss, per_group = ar_mlm.group_losses(o.logits, o.labels, groups, t.ar_mlm_groups)
        parts.update({f"ar_group{j}_loss": v.detach() for j, v in enumerate(per_group)})
    mlm_loss = loss
    if t.self_distill_instance:
        m = o.logits.shape[0] // 2  # masked positions come row by row: first copy, then second
        kl = symmetric_kl(o.logits[:m], o.logits[m:])
        loss = loss + t.self_distill_instance * kl
        parts["sd_instance_kl"] = kl.detach()
    if layers:
        teacher = F.log_softmax(o.logits.detach().float(), -1)
        kls = [F.kl_div(F.log_softmax(lg.float(), -1), teacher, log_target=True, reduction="batchmean")
               for lg in o.layer_logits]
        layer_kl = torch.stack(kls).mean()
        loss = loss + t.self_distill_layer_weight * layer_kl
        parts["sd_layer_kl"] = layer_kl.detach()
    for name, w in {**(t.structure_weights or {}), **(t.knowledge_weights or {})}.items():
        logits, labels = o.aux_logits[name], batch_aux[name]["labels"]
        if name in MLM_AUX or logits.dim() == 3:  # token-level labels, -100 where not predicted
            keep = labels != -100
            labels = labels[keep]
            logits = logits if name in MLM_AUX else logits[keep]
        aux_loss = F.cross_entropy(logits.float(), labels)
        loss = loss + w * aux_loss
        parts[f"{name}_loss"] = aux_loss.detach()
        parts[f"{name}_acc"] = (logits.argmax(-1) == labels).float().mean().detach()
    parts["mlm_loss"] = mlm_loss.detach()
    parts["loss"] = loss.detach()
    return loss, o, parts
