"""The encoder (one file), its HF key map."""

from clueforge.model.bert import BertForMLM, Encoder, ModelConfig
from clueforge.model.hf import load_hf, save_hf

__all__ = ["BertForMLM", "Encoder", "ModelConfig", "load_hf", "save_hf"]
