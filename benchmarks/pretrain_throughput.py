"""Pretraining step throughput: clueforge against transformers' BertForMaskedLM + its WWM collator.

    python benchmarks/pretrain_throughput.py --config mini --device cpu --out bench-out/throughput.json
    python benchmarks/pretrain_throughput.py --config base --device cuda --precision bf16 --batch-size 128
    python benchmarks/pretrain_throughput.py --config mini --ar-mlm-groups 2   # + a column with autoregressive MLM

One step = collate (masking) + forward + backward + gradient clipping + AdamW, for both sides, on
the same packed rows of the same corpus, same shape, batch, sequence length and precision. The two
sides alternate in rounds inside one process so that machine noise hits both alike.

The transformers side is what a user would run: ``BertForMaskedLM`` (default attention
implementation) with ``DataCollatorForLanguageModeling(whole_word_mask=True)``. transformers 5.x
groups whole words by character offsets; we hand it offsets that encode the same jieba word
boundaries clueforge reads from its side channel, so both mask the same kind of units.

Peak memory: on CUDA ``max_memory_allocated`` per side; on CPU the peak RSS of a child process
that runs a few steps of one side only. MFU: useful training FLOPs (6·params·tokens, the
vocabulary projection counted for the predicted tokens only, plus attention) over the measured
peak of a large matmul on the device, for both sides with the same formula.

``--arch NAME …`` adds clueforge sides with an architecture option of issue 14 on (``ARCH_VARIANTS``:
attention residual, POS embeddings, syntax heads), timed in the same rounds; the result's
``arch_options`` gives each one's tokens/s and peak memory against the plain clueforge side:

    python benchmarks/pretrain_throughput.py --config mini --arch attn_residual pos_embeddings syntax_chunk syntax_distance
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_corpus, machine, peak_rss_mb, reset_peak_rss, write_json  # noqa: E402

from clueforge.corpus.shards import Corpus  # noqa: E402
from clueforge.model.bert import BertForMLM, flops_per_token  # noqa: E402
from clueforge.pretrain.config import load_config  # noqa: E402
from clueforge.pretrain.data import Collator, build_row_index  # noqa: E402
from clueforge.pretrain.masking import MaskingConfig  # noqa: E402
from clueforge.pretrain.loop import measure_peak_flops, param_groups  # noqa: E402
from clueforge.text.tokenizer import load_tokenizer, special_ids  # noqa: E402

ARCH_VARIANTS = {  # side "clueforge+NAME": the model with these ModelConfig fields (issue 14)
    "attn_residual": {"attn_residual_decay": 0.5},
    "pos_embeddings": {"pos_embeddings": True},
    "syntax_chunk": {"syntax_heads": 2, "syntax_constraint": "chunk"},
    "syntax_distance": {"syntax_heads": 2, "syntax_constraint": "distance"},
}


class Side:
    """One contender: ``step(i)`` runs one full training step on row batch ``i``; returns real tokens."""

    def __init__(self, kind: str, args, cfg, corpus: Corpus, rows, device: torch.device):
        self.kind, self.args, self.device = kind, args, device
        tok = load_tokenizer(corpus.path / "vocab.txt")
        self.specials = special_ids(tok)
        self.vocab_size = tok.get_vocab_size()
        cfg.model.vocab_size = self.vocab_size
        if kind.startswith("clueforge+"):
            from dataclasses import replace

            cfg.model = replace(cfg.model, **ARCH_VARIANTS[kind.split("+", 1)[1]])
        self.collate = Collator(corpus, self.specials, self.vocab_size, MaskingConfig(ratio=cfg.train.mask_ratio, weights={"wwm": 1.0}),
                                linguistic=cfg.model.linguistic_inputs)
        self.rows = rows
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
        torch.manual_seed(0)
        if kind == "clueforge_ar_mlm":  # issue 14 point 4: k passes of the batch per step
            from clueforge.pretrain.model import PretrainingModel

            self.model = PretrainingModel(BertForMLM(cfg.model)).to(device)
            self.train_cfg = dataclasses.replace(cfg.train, ar_mlm_groups=args.ar_mlm_groups)
        elif kind.startswith("clueforge"):
            self.model = BertForMLM(cfg.model).to(device)
        else:
            import transformers

            hc = transformers.BertConfig(
                vocab_size=self.vocab_size, hidden_size=cfg.model.hidden_size, num_hidden_layers=cfg.model.num_layers,
                num_attention_heads=cfg.model.num_heads, intermediate_size=cfg.model.intermediate_size,
                max_position_embeddings=cfg.model.max_position, pad_token_id=self.specials["pad"])
            self.model = transformers.BertForMaskedLM(hc).to(device)
            self.hf_collator = transformers.DataCollatorForLanguageModeling(
                self._hf_tokenizer(corpus.path), whole_word_mask=True, mlm_probability=cfg.train.mask_ratio)
            self.examples = [self._hf_examples(i) for i in range(len(rows))]
        self.model.train()
        self.forward = torch.compile(self.model) if kind.startswith("clueforge") and args.compile else self.model
        # fused AdamW on both sides: it is transformers' Trainer default (adamw_torch_fused)
        self.opt = torch.optim.AdamW(param_groups(self.model, 0.01), lr=1e-4, fused=True)

    @staticmethod
    def _hf_tokenizer(corpus_dir: Path):
        import shutil
        import tempfile

        from transformers import BertTokenizerFast

        d = Path(tempfile.mkdtemp())
        shutil.copyfile(corpus_dir / "vocab.txt", d / "vocab.txt")
        return BertTokenizerFast.from_pretrained(d)

    def _hf_examples(self, i: int) -> list[dict]:
        """The same rows, with offsets encoding the jieba word boundaries (a gap between words),
        padded to the batch's longest row as a user's ``padding=True`` preprocessing would."""
        built = [self.collate._row(shard, a, b)[0] for shard, a, b in self.rows[i]]
        T = max(r.ids.size for r in built)
        out = []
        for r in built:
            ids, word = r.ids, r.word
            n, pad = ids.size, T - ids.size
            start = np.arange(n) + np.where(word >= 0, word, 0)
            offsets = np.stack([start, start + 1], axis=1)
            offsets[word < 0] = 0
            out.append({"input_ids": ids.tolist() + [self.specials["pad"]] * pad,
                        "attention_mask": [1] * n + [0] * pad,
                        "offset_mapping": offsets.tolist() + [[0, 0]] * pad,
                        "special_tokens_mask": (word < 0).astype(int).tolist() + [1] * pad})
        return out

    def step(self, i: int) -> int:
        if self.kind == "clueforge_ar_mlm":
            return self._ar_mlm_step(i)
        if self.kind.startswith("clueforge"):
            batch = self.collate(self.rows[i], np.random.default_rng(i))
            batch = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in batch.items()}
        else:
            batch = self.hf_collator(self.examples[i])
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())


    def _ar_mlm_step(self, i: int) -> int:
        """The clueforge step with ``train.ar_mlm_groups = k``: the same rows and masking, the group
        draw, the k copies in one forward (``pretrain.ar_mlm``); returns the data tokens read."""
        from clueforge.pretrain import ar_mlm
        from clueforge.pretrain.model import mlm_objective

        batch = self.collate(self.rows[i], np.random.default_rng(i))
        batch["ar_groups"] = ar_mlm.assign_groups(ar_mlm.mask_units(batch["labels"]), self.args.ar_mlm_groups,
                                                  ar_mlm.group_rng(0, i, 0, 0))
        batch = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = mlm_objective(self.model, batch, self.train_cfg)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())


def _row_batches(corpus: Corpus, seq_len: int, batch: int, n: int) -> list[list[tuple[int, int, int]]]:
    index = build_row_index(corpus, seq_len, pack_docs=True)
    order = np.random.default_rng(0).permutation(len(index))
    need = batch * n
    order = np.resize(order, need)
    rows = [(int(index.shard[j]), int(index.span[j, 0]), int(index.span[j, 1])) for j in order]
    return [rows[k * batch:(k + 1) * batch] for k in range(n)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _mem_child(kind: str, args, corpus_dir: str, q) -> None:
    cfg = load_config(args.config, [f"train.seq_len={args.seq_len}"])
    corpus = Corpus(corpus_dir)
    rows = _row_batches(corpus, args.seq_len, args.batch_size, 3)
    reset_peak_rss()
    before = peak_rss_mb()
    side = Side(kind, args, cfg, corpus, rows, torch.device("cpu"))
    for i in range(3):
        side.step(i)
    q.put((before, peak_rss_mb()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mini")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--data", default=None, help="a built corpus directory (default: 20k docs of the real corpus)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the clueforge model (warm-up compiles)")
    ap.add_argument("--arch", nargs="*", default=[], choices=list(ARCH_VARIANTS),
                    help="also time clueforge with these architecture options on (issue 14)")
    ap.add_argument("--ar-mlm-groups", type=int, default=1,
                    help="k > 1 adds a clueforge column with train.ar_mlm_groups = k (issue 14 point 4)")
    ap.add_argument("--out", default="bench-out/pretrain_throughput.json")
    args = ap.parse_args()

    device = torch.device(args.device)
    corpus_dir = benchmark_corpus(args.data)
    corpus = Corpus(corpus_dir)
    cfg = load_config(args.config, [f"train.seq_len={args.seq_len}"])
    n_batches = args.warmup + args.steps * args.rounds
    rows = _row_batches(corpus, args.seq_len, args.batch_size, n_batches)
    sides = {k: Side(k, args, load_config(args.config, [f"train.seq_len={args.seq_len}"]), corpus, rows, device)
             for k in ("clueforge", "transformers", *(f"clueforge+{a}" for a in args.arch))}
    if args.ar_mlm_groups > 1:
        sides["clueforge_ar_mlm"] = Side("clueforge_ar_mlm", args, load_config(args.config, [f"train.seq_len={args.seq_len}"]),
                                         corpus, rows, device)
    cfg.model.vocab_size = sides["clueforge"].vocab_size
    for side in sides.values():
        for i in range(args.warmup):
            side.step(i)
    _sync(device)
    elapsed = {k: 0.0 for k in sides}
    tokens = {k: 0 for k in sides}
    peak_mem = {}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for k in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for s in range(args.steps):
                tokens[k] += sides[k].step(args.warmup + r * args.steps + s)
            _sync(device)
            elapsed[k] += time.perf_counter() - t0
            if device.type == "cuda":
                peak_mem[k] = max(peak_mem.get(k, 0), torch.cuda.max_memory_allocated() / 2**20)
    del sides
    if device.type == "cpu":
        ctx = mp.get_context("spawn")
        for k in ("clueforge", "transformers", *(f"clueforge+{a}" for a in args.arch),
                  *(["clueforge_ar_mlm"] if args.ar_mlm_groups > 1 else [])):
            q = ctx.Queue()
            p = ctx.Process(target=_mem_child, args=(k, args, str(corpus_dir), q))
            p.start()
            before, after = q.get()
            p.join()
            peak_mem[k] = after
            peak_mem[k + "_training_delta"] = after - before

    peak_dtype = torch.bfloat16 if args.precision == "bf16" and device.type == "cuda" else torch.float32
    peak = measure_peak_flops(device, peak_dtype)
    fpt = flops_per_token(cfg.model, args.seq_len, mlm_fraction=cfg.train.mask_ratio)
    tps = {k: tokens[k] / elapsed[k] for k in elapsed}
    result = {
        "benchmark": "pretrain_throughput",
        "config": args.config, "device": args.device, "precision": args.precision, "clueforge_compiled": args.compile,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "timed_steps_per_side": args.steps * args.rounds,
        "clueforge_tokens_per_s": round(tps["clueforge"], 1),
        "transformers_tokens_per_s": round(tps["transformers"], 1),
        "ratio": round(tps["clueforge"] / tps["transformers"], 3),
        "clueforge_peak_mem_mb": round(peak_mem["clueforge"], 1),
        "transformers_peak_mem_mb": round(peak_mem["transformers"], 1),
        "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "child process peak RSS (VmHWM)",
        **({"clueforge_training_delta_mb": round(peak_mem["clueforge_training_delta"], 1),
            "transformers_training_delta_mb": round(peak_mem["transformers_training_delta"], 1)}
           if device.type == "cpu" else {}),
        "flops_per_token": fpt,
        "peak_flops_measured": peak,
        "clueforge_mfu": round(tps["clueforge"] * fpt / peak, 4),
        "transformers_mfu": round(tps["transformers"] * fpt / peak, 4),
        "machine": machine(),
    }
    if args.arch:
        result["arch_options"] = {
            a: {"fields": ARCH_VARIANTS[a], "tokens_per_s": round(tps[f"clueforge+{a}"], 1),
                "tokens_per_s_vs_off": round(tps[f"clueforge+{a}"] / tps["clueforge"], 3),
                "peak_mem_mb": round(peak_mem[f"clueforge+{a}"], 1),
                "peak_mem_vs_off_mb": round(peak_mem[f"clueforge+{a}"] - peak_mem["clueforge"], 1)}
            for a in args.arch}
    if "clueforge_ar_mlm" in tps:  # data tokens per second: a k-pass step reads one batch
        result.update({"ar_mlm_groups": args.ar_mlm_groups,
                       "clueforge_ar_mlm_tokens_per_s": round(tps["clueforge_ar_mlm"], 1),
                       "ar_mlm_vs_clueforge": round(tps["clueforge_ar_mlm"] / tps["clueforge"], 3),
                       "clueforge_ar_mlm_peak_mem_mb": round(peak_mem["clueforge_ar_mlm"], 1)})
    write_json(args.out, result)


if __name__ == "__main__":
    main()
