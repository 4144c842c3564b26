"""Text processing: normalisation, sentence splitting, segmentation with POS, WordPiece."""

from clueforge.text.normalize import normalize, split_sentences
from clueforge.text.segment import POS_TAGS, Segmenter
from clueforge.text.tokenizer import SPECIAL_TOKENS, load_tokenizer

__all__ = ["normalize", "split_sentences", "Segmenter", "POS_TAGS", "load_tokenizer", "SPECIAL_TOKENS"]
