"""What each architecture option of issue 14 costs per training step, against the plain encoder.

    python benchmarks/arch_step_cost.py --config tiny --data runs/corpus --out bench-out/arch_step_cost.json

Every side trains the same model shape on the same real batches (rows of a built corpus, whole-word
masking, the linguistic channel for the sides that read it); sides alternate step by step inside one
process and one thread, and the figure is the median step time, so a busy neighbour slows every side
alike instead of one side's block of steps. Writes JSON: seconds per step and the ratio to off.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from clueforge.corpus.shards import Corpus  # noqa: E402
from clueforge.model.bert import BertForMLM  # noqa: E402
from clueforge.pretrain.ar_mlm import assign_groups, group_rng, mask_units  # noqa: E402
from clueforge.pretrain.config import load_config  # noqa: E402
from clueforge.pretrain.data import Collator, build_row_index  # noqa: E402
from clueforge.pretrain.masking import MaskingConfig  # noqa: E402
from clueforge.pretrain.model import PretrainingModel, mlm_objective  # noqa: E402
from clueforge.text.tokenizer import load_tokenizer, special_ids  # noqa: E402

SIDES = {
    "off": ({}, 1),
    "attn_residual 0.5": ({"attn_residual_decay": 0.5}, 1),
    "pos_embeddings": ({"pos_embeddings": True}, 1),
    "syntax chunk 2 heads": ({"syntax_heads": 2, "syntax_constraint": "chunk"}, 1),
    "syntax distance 2 heads": ({"syntax_heads": 2, "syntax_constraint": "distance"}, 1),
    "ar_mlm k=2": ({}, 2),
    "relative_attention 8": ({"relative_attention": 8}, 1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--data", required=True, help="a built corpus directory")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side (interleaved)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench-out/arch_step_cost.json")
    ap.add_argument("--sides", nargs="+", choices=list(SIDES), help="only these sides (off is always timed)")
    ap.add_argument("--masking", default="wwm", choices=["wwm", "token"])
    ap.add_argument("--mask-ratio", type=float, default=0.15)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast, as train.precision=bf16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    corpus = Corpus(args.data)
    tok = load_tokenizer(corpus.path / "vocab.txt")
    specials, vocab = special_ids(tok), tok.get_vocab_size()
    index = build_row_index(corpus, args.seq_len, pack_docs=True)
    order = np.random.default_rng(0).permutation(len(index))
    rows = [(int(index.shard[j]), int(index.span[j, 0]), int(index.span[j, 1])) for j in order[: args.batch_size * 4]]
    batches_rows = [rows[i * args.batch_size:(i + 1) * args.batch_size] for i in range(4)]
    cfg = load_config(args.config, [f"train.seq_len={args.seq_len}"])
    cfg.model.vocab_size = vocab
    sides, options = {}, {}
    chosen = {n: v for n, v in SIDES.items() if args.sides is None or n == "off" or n in args.sides}
    plain = dataclasses.replace(cfg.model, attn_residual_decay=0.0, pos_embeddings=False, syntax_heads=0,
                                relative_attention=0)  # every option off (a config may set one): "off" is plain
    for name, (opts, k) in chosen.items():
        mcfg = dataclasses.replace(plain, **opts)
        collate = Collator(corpus, specials, vocab, MaskingConfig(ratio=args.mask_ratio, weights={args.masking: 1.0}),
                           linguistic=mcfg.linguistic_inputs)
        batches = []
        for i, br in enumerate(batches_rows):
            b = collate(br, np.random.default_rng(i))
            if k > 1:
                b["ar_groups"] = assign_groups(mask_units(b["labels"]), k, group_rng(0, i, 0, 0))
            batches.append({key: torch.from_numpy(v) for key, v in b.items()})
        torch.manual_seed(0)
        model = PretrainingModel(BertForMLM(mcfg))
        t = dataclasses.replace(cfg.train, ar_mlm_groups=k, self_distill_layers=None, self_distill_instance=0.0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        sides[name] = (model, t, batches, opt)
        options[name] = mcfg.arch_options

    def step(name: str, i: int) -> float:
        model, t, batches, opt = sides[name]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = mlm_objective(model, batches[i % len(batches)], t)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in sides:  # warm-up
        for i in range(3):
            step(name, i)
    times = {name: [] for name in sides}
    for i in range(args.steps):
        for name in (list(sides) if i % 2 == 0 else list(reversed(sides))):
            times[name].append(step(name, i))
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {
        "benchmark": "arch_step_cost", "config": args.config, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "threads": args.threads, "timed_steps_per_side": args.steps, "bf16": args.bf16, "masking": args.masking,
        "mask_ratio": args.mask_ratio,
        "sides": {n: {"arch_options": options[n], "median_s_per_step": round(med[n], 4), "step_time_vs_off": round(med[n] / med["off"], 3),
                      "data_tokens_per_s_vs_off": round(med["off"] / med[n], 3)} for n in sides},
        "machine": machine(),
    }
    write_json(args.out, result)
    for n in sides:
        print(f"{n:28s} {med[n]*1000:8.1f} ms/step  {med[n] / med['off']:.2f}x off")


if __name__ == "__main__":
    main()
