"""Where a pretrained model's attention heads look: the mean attention weight that masked
positions give to the tokens 2 and 1 before, themselves, and 1 and 2 after, per layer and head,
plus the attention entropy (nats; uniform over 128 tokens is 4.85).

Used to read the small recipe's plateau (docs/benchmarks.md, "Small budget"): leaving it coincides
with one head of the first layer turning to the neighbouring tokens.

    python benchmarks/attention_offsets.py --data runs/corpus-real runs/small/checkpoints/step-* \\
        --out bench-out/attention_offsets.json

Inputs: the fixed protocol's first held-out batch (32 rows of 128 tokens, token masking 15 %,
masking seed 0: ``budget.fixed_heldout``'s first batch). Scores are recomputed from each layer's
query/key projections, plus the relative-position bias of a ``relative_attention`` model (the model
itself runs through SDPA, which does not return them); the test
``test_attention_offsets_reads_the_weights_sdpa_uses`` checks they give the layer's output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

OFFSETS = (-2, -1, 0, 1, 2)


def fixed_batch(data: str | Path, seq_len: int = 128) -> dict:
    """The first batch of the fixed held-out protocol."""
    from clueforge.corpus.shards import Corpus
    from clueforge.pretrain.data import Collator, build_row_index, split_heldout
    from clueforge.pretrain.loop import FIXED_EVAL_BATCH, FIXED_EVAL_MASKING, FIXED_EVAL_SEED
    from clueforge.text.tokenizer import load_tokenizer, special_ids

    corpus = Corpus(data)
    tok = load_tokenizer(Path(data) / "vocab.txt")
    _, rows = split_heldout(build_row_index(corpus, seq_len, True), corpus)
    rows = rows.select(np.arange(min(FIXED_EVAL_BATCH, len(rows))))
    col = Collator(corpus, special_ids(tok), tok.get_vocab_size(), FIXED_EVAL_MASKING, tokenizer=tok)
    batch = col(list(zip(rows.shard.tolist(), rows.span[:, 0].tolist(), rows.span[:, 1].tolist())),
                np.random.default_rng([FIXED_EVAL_SEED, 3, 0]), progress=1.0)
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def attention_probs(model, batch: dict) -> list[torch.Tensor]:
    """Per layer, (B, H, T, T) attention probabilities of a clueforge encoder, plain or with
    relative positions (``relative_attention``: its bias is added as the model adds it). The
    layers are run one by one, each reading what the previous one wrote."""
    from clueforge.model.bert import attention_bias

    enc = model.encoder
    mask = attention_bias(batch.get("attention_mask"), batch.get("doc_ids"))
    st = enc.structure(mask, None, batch["input_ids"].shape[1]) if enc.cfg.relative_attention else None
    probs = []
    with torch.no_grad():
        x = enc.embeddings(batch["input_ids"], batch.get("token_type_ids"))
        for layer in enc.layers:
            a = layer.attn
            h = layer.ln1(x) if layer.pre_ln else x
            B, T, D = h.shape
            q, k, _ = a.qkv(h).view(B, T, 3, a.n_heads, D // a.n_heads).permute(2, 0, 3, 1, 4)
            s = q @ k.transpose(-1, -2) / (D // a.n_heads) ** 0.5  # (B, H, T, T)
            if st is not None:  # the padding/document mask and the relative bias, as the model adds them
                s = s + a._bias(mask, st, s.dtype)
            elif mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            probs.append(s.softmax(-1))
            x = layer.forward_options(x, mask, st, None)[0] if st is not None else layer(x, mask)
    return probs


def offsets(probs: list[torch.Tensor], at: torch.Tensor) -> list[dict]:
    """Mean weight on each offset of ``OFFSETS`` and mean entropy, over the query positions ``at``
    (B, T) bool, per layer and head."""
    out = []
    for li, a in enumerate(probs):
        T = a.shape[-1]
        for h in range(a.shape[1]):
            ah = a[:, h]  # (B, T, T)
            row = {"layer": li, "head": h}
            for off in OFFSETS:
                q = torch.arange(max(0, -off), min(T, T - off))
                sel = at[:, q]
                row[f"{off:+d}"] = float(ah[:, q, q + off][sel].mean())
            row["entropy"] = float(-(ah * ah.clamp_min(1e-12).log()).sum(-1)[at].mean())
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="saved models (HF layout: final/ or checkpoints/step-N)")
    ap.add_argument("--data", required=True, help="the corpus the models were pretrained on")
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args()
    from clueforge.model.hf import load_hf

    batch = fixed_batch(args.data)
    at = batch["labels"] != -100  # the masked positions
    rows = []
    for m in args.models:
        model = load_hf(m).eval()
        if set(model.cfg.arch_options) - {"relative_attention"}:
            sys.exit(f"{m}: architecture options {model.cfg.arch_options} change the scores; not supported here")
        heads = offsets(attention_probs(model, batch), at)
        rows.append({"model": m, "heads": heads})
        print(m)
        for r in heads:
            print(f"  L{r['layer']}H{r['head']}: " + " ".join(f"{o:+d}: {r[f'{o:+d}']:.3f}" for o in OFFSETS)
                  + f"  entropy {r['entropy']:.2f}")
    if args.out:
        from clueforge.utils import atomic_write

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.out), json.dumps({"benchmark": "attention-offsets", "rows": rows,
                                                 "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
