"""Hugging Face BERT layout ↔ clueforge encoder, through one explicit key map.

Reads any local ``BertModel`` / ``BertForMaskedLM`` / ``BertForPreTraining`` directory
(bert-base-chinese, RoBERTa-wwm-ext, MacBERT and Mengzi-BERT all use this layout): weights from
``model.safetensors`` (also sharded) or, failing that, ``pytorch_model.bin`` read with
``torch.load(weights_only=True)`` (no arbitrary unpickling). Writes ``config.json`` +
``model.safetensors`` that ``transformers.AutoModelForMaskedLM.from_pretrained`` loads.

A model with an architecture option on (``ModelConfig.arch_options``: attention residual, POS
embeddings, syntax heads) is no BERT ``transformers`` can run: it is saved with ``model_type``
``ARCH_MODEL_TYPE``, the options (and the POS tag set) under ``clueforge`` in ``config.json``, and
``hidden_act`` set to a message, so that ``transformers`` refuses it — the Auto classes on the
unknown model type, ``BertFor*.from_pretrained`` on the activation — with a message that says to
load it with ``clueforge.model.hf.load_hf`` (or ``clueforge finetune`` / ``predict``), instead of
silently loading a plain BERT and dropping the option's weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clueforge.model.bert import BertForMLM, ModelConfig
from clueforge.text.segment import POS_TAGS
from clueforge.utils import UserError, replace_dir

# ours (per layer: {i}) → HF, relative to the "bert." prefix unless it starts with "cls.".
_LAYER_MAP = {
    "attn.out.weight": "attention.output.dense.weight",
    "attn.out.bias": "attention.output.dense.bias",
    "ln1.weight": "attention.output.LayerNorm.weight",
    "ln1.bias": "attention.output.LayerNorm.bias",
    "mlp_in.weight": "intermediate.dense.weight",
    "mlp_in.bias": "intermediate.dense.bias",
    "mlp_out.weight": "output.dense.weight",
    "mlp_out.bias": "output.dense.bias",
    "ln2.weight": "output.LayerNorm.weight",
    "ln2.bias": "output.LayerNorm.bias",
}
_FIXED_MAP = {
    "encoder.embeddings.word.weight": "bert.embeddings.word_embeddings.weight",
    "encoder.embeddings.position.weight": "bert.embeddings.position_embeddings.weight",
    "encoder.embeddings.token_type.weight": "bert.embeddings.token_type_embeddings.weight",
    "encoder.embeddings.ln.weight": "bert.embeddings.LayerNorm.weight",
    "encoder.embeddings.ln.bias": "bert.embeddings.LayerNorm.bias",
    "encoder.final_ln.weight": "bert.encoder.final_layer_norm.weight",  # pre-LN only (clueforge)
    "encoder.final_ln.bias": "bert.encoder.final_layer_norm.bias",
}
_MLM_HEAD_MAP = {
    "head.dense.weight": "cls.predictions.transform.dense.weight",
    "head.dense.bias": "cls.predictions.transform.dense.bias",
    "head.ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "head.ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "head.bias": "cls.predictions.bias",
}
_OPTION_FIXED_MAP = {  # architecture options (issue 14): present only when the option is on
    "encoder.embeddings.pos_tag.weight": "bert.embeddings.pos_tag_embeddings.weight",
    "encoder.embeddings.boundary.weight": "bert.embeddings.word_boundary_embeddings.weight",
}
_OPTION_LAYER_MAP = {"attn.distance_bias": "attention.self.distance_bias",
                     "attn.relative_bias": "attention.self.relative_bias"}
ARCH_MODEL_TYPE = "clueforge-bert (not a transformers BERT: load it with clueforge.model.hf.load_hf)"
ARCH_REFUSAL = ("this clueforge checkpoint uses architecture options that transformers' BERT does not compute "
                "(see 'clueforge' in config.json); loading it as BERT would drop weights. Load it with "
                "clueforge.model.hf.load_hf(path) / load_hf_task(path, head, n), or `clueforge finetune|predict`")
_POOLER = {"pooler.weight": "bert.pooler.dense.weight", "pooler.bias": "bert.pooler.dense.bias"}
_CLASSIFIER = {"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"}
_TASK_HEAD_MAPS = {
    "sequence": {**_POOLER, **_CLASSIFIER},
    "choice": {**_POOLER, **_CLASSIFIER},
    "token": _CLASSIFIER,
    "span": {"classifier.weight": "qa_outputs.weight", "classifier.bias": "qa_outputs.bias"},
}
HF_ARCHITECTURES = {"sequence": "BertForSequenceClassification", "choice": "BertForMultipleChoice",
                    "token": "BertForTokenClassification", "span": "BertForQuestionAnswering"}


def _head_map(model) -> dict[str, str]:
    head = getattr(model, "head", None)
    return _TASK_HEAD_MAPS[head] if isinstance(head, str) else _MLM_HEAD_MAP
_QKV = ("query", "key", "value")


def hf_config(cfg: ModelConfig) -> dict:
    out = {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "layer_norm_eps": cfg.layer_norm_eps,
        "initializer_range": cfg.initializer_range,
        "pad_token_id": cfg.pad_token_id,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "clueforge": {"pre_ln": cfg.pre_ln},
    }
    if cfg.arch_options:  # refused by transformers with ARCH_REFUSAL (see the module doc)
        out["model_type"] = ARCH_MODEL_TYPE
        out["architectures"] = ["ClueforgeBertForMaskedLM"]
        out["hidden_act"] = ARCH_REFUSAL
        out["clueforge"].update(cfg.arch_options, hidden_act="gelu")
        if cfg.pos_embeddings:
            out["clueforge"]["pos_tags"] = list(POS_TAGS)
        return out
    if cfg.pre_ln:  # not a BERT transformers can run: make it refuse rather than compute garbage
        out["model_type"] = "clueforge-bert-preln"
        out["architectures"] = ["ClueforgeBertPreLN"]
    return out


def config_from_hf(d: dict, path: Path | None = None) -> ModelConfig:
    where = f"{path}: " if path else ""
    ours = d.get("clueforge", {})
    act = ours["hidden_act"] if "hidden_act" in ours else d.get("hidden_act", "gelu")
    if act not in ("gelu",):
        raise ValueError(f"{where}hidden_act {act!r} is not supported (exact GELU only)")
    tags = ours.get("pos_tags")
    if tags is not None and list(POS_TAGS[:len(tags)]) != list(tags):
        raise UserError(f"{where}the model's POS tag set differs from this clueforge's (text.segment.POS_TAGS): "
                        f"its POS embeddings would read the wrong rows")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{where}only absolute position embeddings are supported")
    return ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_position=d.get("max_position_embeddings", 512),
        type_vocab_size=d.get("type_vocab_size", 2),
        dropout=d.get("hidden_dropout_prob", 0.1),
        attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        initializer_range=d.get("initializer_range", 0.02),
        pad_token_id=d.get("pad_token_id", 0) or 0,
        pre_ln=bool(ours.get("pre_ln", False)),
        attn_residual_decay=float(ours.get("attn_residual_decay", 0.0)),
        pos_embeddings=bool(ours.get("pos_embeddings", False)),
        syntax_heads=int(ours.get("syntax_heads", 0)),
        syntax_constraint=ours.get("syntax_constraint", "word"),
        relative_attention=int(ours.get("relative_attention", 0)),
    )


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """A ``BertForMLM`` or ``SequenceClassifier`` state dict under HF names."""
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for i in range(model.cfg.num_layers):
        ours = f"encoder.layers.{i}."
        hf = f"bert.encoder.layer.{i}."
        for part in ("weight", "bias"):
            for name, t in zip(_QKV, sd[ours + f"attn.qkv.{part}"].chunk(3, dim=0)):
                out[hf + f"attention.self.{name}.{part}"] = t
        for k, v in _LAYER_MAP.items():
            out[hf + v] = sd[ours + k]
        for k, v in _OPTION_LAYER_MAP.items():
            if ours + k in sd:
                out[hf + v] = sd[ours + k]
    for k, v in {**_FIXED_MAP, **_OPTION_FIXED_MAP, **_head_map(model)}.items():
        if k in sd:
            out[v] = sd[k]
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _normalise_hf_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if not k.startswith(("bert.", "cls.", "classifier.", "qa_outputs.")):
            k = "bert." + k  # a bare BertModel checkpoint
        out[k] = v
    return out


def from_hf_state_dict(model, hf: dict[str, torch.Tensor], *, strict_head: bool = False) -> list[str]:
    """Copy HF weights into ``model`` (``BertForMLM`` or ``SequenceClassifier``). Returns the names
    of our head parameters that the checkpoint lacked (e.g. the MLM head of a bare ``BertModel``,
    the classifier of a pretrained encoder), which keep their initialisation."""
    hf = _normalise_hf_keys(hf)
    target: dict[str, torch.Tensor] = {}
    for i in range(model.cfg.num_layers):
        ours = f"encoder.layers.{i}."
        src = f"bert.encoder.layer.{i}."
        for part in ("weight", "bias"):
            keys = [src + f"attention.self.{n}.{part}" for n in _QKV]
            missing = [k for k in keys if k not in hf]
            if missing:
                raise KeyError(f"checkpoint lacks {missing[0]}")
            target[ours + f"attn.qkv.{part}"] = torch.cat([hf[k] for k in keys], dim=0)
        for k, v in _LAYER_MAP.items():
            if src + v not in hf:
                raise KeyError(f"checkpoint lacks {src + v}")
            target[ours + k] = hf[src + v]
    own = model.state_dict()
    options = {**_OPTION_FIXED_MAP, **{f"encoder.layers.{i}.{k}": f"bert.encoder.layer.{i}.{v}"
                                       for i in range(model.cfg.num_layers) for k, v in _OPTION_LAYER_MAP.items()}}
    for k, v in options.items():
        if k in own and v not in hf:
            raise KeyError(f"checkpoint lacks {v} (the model's config turns on an option that needs it)")
        if k in own:
            target[k] = hf[v]
        elif v in hf:
            raise KeyError(f"checkpoint has {v} but its config turns the option off: refusing to drop it")
    absent = []
    for k, v in _FIXED_MAP.items():
        if v in hf:
            target[k] = hf[v]
        elif not k.startswith("encoder.final_ln"):
            raise KeyError(f"checkpoint lacks {v}")
    for k, v in _head_map(model).items():
        if v in hf:
            target[k] = hf[v]
        else:
            absent.append(k)
    if model.cfg.pre_ln and "encoder.final_ln.weight" not in target:
        raise KeyError("checkpoint lacks bert.encoder.final_layer_norm (a pre-LN model needs it)")
    if strict_head and absent:
        raise KeyError(f"checkpoint lacks {absent}")
    for k, v in target.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} ≠ model {tuple(own[k].shape)}")
    model.load_state_dict(target, strict=False)
    return absent


def _shard_path(path: Path, name: object, index: Path) -> Path:
    """A file named by a sharded index, refused unless it is a plain file name inside ``path``."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"{index}: weight file {name!r} is outside the model directory; refusing it")
    full = path / name
    if path.resolve() not in full.resolve().parents:
        raise UserError(f"{index}: weight file {name!r} resolves outside the model directory; refusing it")
    return full


def _load_weights_file(f: Path) -> dict[str, torch.Tensor]:
    """``load_file`` with a truncated or corrupt file reported as the user's problem."""
    try:
        return load_file(f)
    except FileNotFoundError:
        raise UserError(f"{f} not found") from None
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError on short reads)
        raise UserError(f"{f} is not a readable safetensors file ({exc}); the download or copy is probably "
                        f"incomplete") from None


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return _load_weights_file(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{index}: not a valid index (expected a JSON object with weight_map)") from None
        files = [_shard_path(path, f, index) for f in sorted(set(weight_map.values()), key=str)]
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(_load_weights_file(f))
        return sd
    legacy = path / "pytorch_model.bin"
    if legacy.is_file():
        import pickle

        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{legacy}: refused to load: it holds Python objects beyond tensors, which "
                            f"weights_only loading does not run ({first[:160]}); convert it to safetensors "
                            f"with the tool that made it") from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise UserError(f"{legacy} is not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:160]})") from None
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def read_hf_config(path: str | Path) -> tuple[ModelConfig, dict]:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not a Hugging Face model directory")
    raw = json.loads(cfg_file.read_text())
    return config_from_hf(raw, cfg_file), raw


def load_hf(path: str | Path) -> BertForMLM:
    """Build a ``BertForMLM`` from a local HF BERT-family directory."""
    cfg, _ = read_hf_config(path)
    model = BertForMLM(cfg)
    from_hf_state_dict(model, read_hf_weights(Path(path)))
    return model


def saved_pooling(raw: dict) -> str | None:
    """What a saved sentence/choice head reads (``TaskModel.pooling``), from a raw config.json;
    ``None`` when it records none (a pretrained model, or a [CLS] head saved before pooling existed)."""
    return raw.get("clueforge", {}).get("pooling")


def load_hf_classifier(path: str | Path, num_labels: int):
    """A ``SequenceClassifier`` from a local HF directory (see ``load_hf_task``)."""
    from clueforge.model.heads import SequenceClassifier

    cfg, raw = read_hf_config(path)
    model = SequenceClassifier(cfg, num_labels, saved_pooling(raw) or "cls")
    from_hf_state_dict(model, read_hf_weights(Path(path)))
    return model


def load_hf_task(path: str | Path, head: str, num_labels: int):
    """A ``TaskModel`` from a local HF directory: a pretrained encoder (head initialised) or a
    fine-tuned ``BertFor*`` checkpoint of that head (head loaded; shapes must match)."""
    from clueforge.model.heads import TaskModel

    cfg, raw = read_hf_config(path)
    model = TaskModel(cfg, head, num_labels, pooling=saved_pooling(raw) or "cls")
    from_hf_state_dict(model, read_hf_weights(Path(path)))
    return model


def save_hf(model, out: str | Path, *, vocab: str | Path | None = None, extra_config: dict | None = None,
            extra_files=None) -> Path:
    """Write ``out/`` in the HF layout (atomically: a temporary directory renamed at the end; an old
    ``out/`` is renamed aside first and removed only once the new one is in place).
    ``extra_files(tmp)`` writes more files into the directory before the rename."""
    from clueforge.text.tokenizer import save_tokenizer_files

    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
    cfg = hf_config(model.cfg)
    head = getattr(model, "head", None)
    pooling = getattr(model, "pooling", "cls")
    if isinstance(head, str) and not model.cfg.pre_ln and not model.cfg.arch_options and pooling == "cls":
        cfg["architectures"] = [HF_ARCHITECTURES[head]]
    if pooling != "cls":  # transformers' heads read [CLS]: make it refuse rather than compute another model
        cfg["clueforge"]["pooling"] = pooling
        if cfg["model_type"] == "bert":
            cfg["model_type"], cfg["architectures"] = "clueforge-bert-mean-pooling", ["ClueforgeBertMeanPooling"]
    if head in ("sequence", "token"):
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(model.num_labels)}
    cfg.update(extra_config or {})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    if vocab is not None:
        save_tokenizer_files(vocab, tmp, max_length=model.cfg.max_position)
    if extra_files is not None:
        extra_files(tmp)
    replace_dir(tmp, out)
    return out
