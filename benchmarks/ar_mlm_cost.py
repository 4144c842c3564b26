"""What an autoregressive-MLM step costs, laid out three ways (issue 14, point 4).

    OMP_NUM_THREADS=2 python benchmarks/ar_mlm_cost.py --config tiny --seq-len 64 --batch-size 16 --groups 2 4 \
        --data runs/corpus --out bench-out/ar_mlm_cost_tiny.json

An exact k-group step is k passes of every row through the encoder (each hidden state depends on
which groups are revealed); the layouts differ only in how the k passes are arranged:

- ``batch``: the k inputs as one batch of k·B rows, one forward (what ``pretrain.ar_mlm`` does);
- ``loop``: k forwards of B rows, one backward of the summed loss;
- ``row``: one forward of B rows of k·T tokens, the k copies side by side under a block-diagonal
  attention mask (the "one forward with a partial-visibility mask" form; positions are not
  re-used across copies here, so this times the layout, it is not a training path).

One step = collate + group draw + forward + backward + AdamW on the same packed rows, the layouts
alternating in rounds. Tokens/s counts the data tokens of the batch (a k-pass step reads B rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_corpus, machine, write_json  # noqa: E402
from pretrain_throughput import _row_batches  # noqa: E402

from clueforge.corpus.shards import Corpus  # noqa: E402
from clueforge.model.bert import BertForMLM  # noqa: E402
from clueforge.pretrain import ar_mlm  # noqa: E402
from clueforge.pretrain.config import load_config  # noqa: E402
from clueforge.pretrain.data import Collator  # noqa: E402
from clueforge.pretrain.loop import masking_config, param_groups  # noqa: E402
from clueforge.pretrain.model import PretrainingModel, mlm_objective  # noqa: E402
from clueforge.text.tokenizer import load_tokenizer, special_ids  # noqa: E402


def step_loss(model: PretrainingModel, batch: dict, groups: torch.Tensor | None, k: int, layout: str, t):
    if groups is None:  # plain MLM
        return mlm_objective(model, batch, t)[0]
    if layout == "batch":
        return mlm_objective(model, {**batch, "ar_groups": groups}, t)[0]
    ex = ar_mlm.expand(batch, groups, k)
    B, T = batch["input_ids"].shape
    if layout == "loop":
        losses = []
        for j in range(k):
            part = {key: v[j * B:(j + 1) * B] for key, v in ex.items()}
            losses.append(model(**part).loss)
        return torch.stack(losses).mean()
    # row: copy j at columns j·T … (j+1)·T - 1 of one row, attention kept inside each copy
    wide = {key: v.view(k, B, T).permute(1, 0, 2).reshape(B, k * T) for key, v in ex.items()}
    wide["doc_ids"] = torch.arange(k).repeat_interleave(T).expand(B, k * T)
    return model(**wide).loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per layout per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default=None, help="a built corpus directory (default: 20k docs of the real corpus)")
    ap.add_argument("--out", default="bench-out/ar_mlm_cost.json")
    args = ap.parse_args()

    corpus = Corpus(benchmark_corpus(args.data))
    cfg = load_config(args.config, [f"train.seq_len={args.seq_len}"])
    tok = load_tokenizer(corpus.path / "vocab.txt")
    cfg.model.vocab_size = tok.get_vocab_size()
    cfg.model.max_position = max(cfg.model.max_position, max(args.groups) * args.seq_len)  # the "row" layout
    collate = Collator(corpus, special_ids(tok), cfg.model.vocab_size, masking_config(cfg.train))
    layouts = [("plain", 1)] + [(f"{lay} k={k}", k) for k in args.groups for lay in ("batch", "loop", "row")]
    rows = _row_batches(corpus, args.seq_len, args.batch_size, 1 + args.steps * args.rounds)
    models = {}
    for name, _ in layouts:
        torch.manual_seed(0)
        m = PretrainingModel(BertForMLM(cfg.model)).train()
        models[name] = (m, torch.optim.AdamW(param_groups(m, 0.01), lr=1e-4))

    def run(name: str, k: int, i: int) -> int:
        m, opt = models[name]
        np_batch = collate(rows[i], np.random.default_rng(i))
        batch = {key: torch.from_numpy(v) for key, v in np_batch.items()}
        groups = None if k == 1 else torch.from_numpy(
            ar_mlm.assign_groups(ar_mlm.mask_units(np_batch["labels"]), k, ar_mlm.group_rng(0, i, 0, 0)))
        loss = step_loss(m, batch, groups, k, name.split()[0], dataclasses.replace(cfg.train, ar_mlm_groups=k))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(np_batch["attention_mask"].sum())

    for name, k in layouts:  # warm-up
        run(name, k, 0)
    elapsed = {name: 0.0 for name, _ in layouts}
    tokens = {name: 0 for name, _ in layouts}
    for r in range(args.rounds):
        for name, k in (layouts if r % 2 == 0 else layouts[::-1]):
            t0 = time.perf_counter()
            for s in range(args.steps):
                tokens[name] += run(name, k, 1 + r * args.steps + s)
            elapsed[name] += time.perf_counter() - t0
    tps = {name: tokens[name] / elapsed[name] for name in elapsed}
    result = {"benchmark": "ar_mlm_cost", "config": args.config, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "timed_steps_per_layout": args.steps * args.rounds,
              "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
              "relative_to_plain": {k: round(v / tps["plain"], 3) for k, v in tps.items()},
              "machine": machine()}
    write_json(args.out, result)
    print("| layout | tokens/s | vs plain |\n|---|---:|---:|")
    for name in tps:
        print(f"| {name} | {tps[name]:,.0f} | {tps[name] / tps['plain']:.2f}× |")


if __name__ == "__main__":
    main()
