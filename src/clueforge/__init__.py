"""clueforge: build CLUE-class Chinese language-understanding models end to end.

The package folders follow the data: ``text`` (normalise, segment, tokenise) → ``corpus``
(memory-mapped shards with side channels) → ``model`` (the encoder and its HF key map) →
``pretrain`` (masking, packing, the training loop).
"""

__version__ = "0.1.0"
