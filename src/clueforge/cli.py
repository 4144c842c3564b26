"""The ``clueforge`` command line: each command is a thin call into one stage.

    clueforge quickstart                      the whole spine on the embedded sample, minutes on a CPU
    clueforge vocab build INPUT... --out vocab.txt
    clueforge corpus build INPUT... --out DIR --vocab vocab.txt [--workers N]
    clueforge corpus stats DIR
    clueforge pretrain --config mini --data DIR --out DIR [--max-steps N] [--set train.lr=3e-4]
    clueforge finetune TASK --data DIR --model PATH --out DIR [--seed S] [--set key=value ...]
    clueforge predict TASK --model DIR --input FILE --out FILE [--runtime onnx]
    clueforge export DIR --format onnx [--int8] [--data DIR] --out DIR
    clueforge serve DIR [--runtime torch|onnx] --port 8000 [--max-batch 32 --max-wait-ms 5 --queue 256]
    clueforge submit DIR --data DIR
    clueforge benchmark SUITE --model PATH --data DIR --out DIR [--seeds 3]
    clueforge tasks                           the task registry
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build CLUE-class Chinese language models.")
vocab_app = typer.Typer(no_args_is_help=True, help="WordPiece vocabularies.")
corpus_app = typer.Typer(no_args_is_help=True, help="Training shards from raw text.")
app.add_typer(vocab_app, name="vocab")
app.add_typer(corpus_app, name="corpus")
console = Console(stderr=True)

SAMPLE = Path(__file__).resolve().parent / "data" / "sample_corpus.txt"


def _logging(verbose: bool = False) -> None:
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING
    else:
        level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)],
                        force=True)
    for noisy in ("accelerate", "torch", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(2)


@vocab_app.command("build")
def vocab_build(
    inputs: Annotated[list[Path], typer.Argument(help="Text/JSONL files or folders.")],
    out: Annotated[Path, typer.Option(help="Where to write vocab.txt.")],
    vocab_size: Annotated[int, typer.Option(help="Target size (at most 65,535).")] = 21128,
    min_frequency: Annotated[int, typer.Option(help="Minimum count of a merged piece.")] = 2,
    text_field: Annotated[str, typer.Option(help="JSONL field with the text.")] = "text",
    doc_sep: Annotated[str, typer.Option(help="Plain text: 'line' or 'blank'.")] = "line",
) -> None:
    """Train a WordPiece vocabulary (Chinese characters kept whole)."""
    from clueforge.corpus.build import BuildConfig, iter_texts
    from clueforge.text.vocab import build_vocab

    _logging()
    cfg = BuildConfig(vocab="", text_field=text_field, doc_sep=doc_sep)
    try:
        n = build_vocab(iter_texts(inputs, cfg), out, vocab_size=vocab_size, min_frequency=min_frequency)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    console.print(f"wrote {out} ({n} entries)")


@corpus_app.command("build")
def corpus_build(
    inputs: Annotated[list[Path], typer.Argument(help="Files (.txt/.jsonl, optionally .gz/.zst) or folders.")],
    out: Annotated[Path, typer.Option(help="Output directory (re-run to resume).")],
    vocab: Annotated[Path, typer.Option(help="WordPiece vocab.txt (or a model directory with one).")],
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    doc_sep: Annotated[str, typer.Option(help="Plain text: 'line' (a document per line) or 'blank'.")] = "line",
    text_field: Annotated[str, typer.Option(help="JSONL field with the text.")] = "text",
    docs_per_shard: Annotated[int, typer.Option(help="Raw documents per shard.")] = 10_000,
    min_chars: Annotated[int, typer.Option(help="Skip shorter documents.")] = 2,
    t2s: Annotated[bool, typer.Option(help="Traditional → simplified (OpenCC).")] = False,
    user_dict: Annotated[Optional[Path], typer.Option(help="rjieba user dictionary.")] = None,
    entities: Annotated[Optional[list[Path]], typer.Option(help="Typed entity list (entity<TAB>type) or folder of per-type files; repeatable.")] = None,
    triples: Annotated[Optional[list[Path]], typer.Option(help="KG triples (head<TAB>relation<TAB>tail) whose heads are marked; repeatable.")] = None,
    pos_entities: Annotated[bool, typer.Option(help="With knowledge files: also mark rjieba's person/place/org/proper-noun words.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Normalise, split, segment (+POS) and tokenise text into memory-mapped shards (and mark
    entity mentions when knowledge files are given)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn

    from clueforge.corpus.build import BuildConfig, build_corpus, expand_inputs

    _logging()
    if doc_sep not in ("line", "blank"):
        _fail(f"--doc-sep {doc_sep!r}: expected 'line' or 'blank'")
    cfg = BuildConfig(vocab=str(vocab), text_field=text_field, doc_sep=doc_sep, docs_per_shard=docs_per_shard,
                      min_chars=min_chars, t2s=t2s, user_dict=str(user_dict) if user_dict else None,
                      entities=tuple(str(p) for p in entities or ()), triples=tuple(str(p) for p in triples or ()),
                      pos_entities=pos_entities)
    try:
        total_bytes = sum(f.stat().st_size for f in expand_inputs(inputs))
    except FileNotFoundError as exc:
        _fail(str(exc))
    t0 = time.perf_counter()
    with Progress(TextColumn("corpus build"), BarColumn(), TextColumn("{task.fields[docs]:,} docs"),
                  TransferSpeedColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=console, disable=not progress) as bar:
        task = bar.add_task("build", total=total_bytes, docs=0)
        frac = {"docs": 0, "chars": 0}

        def on_shard(stats: dict) -> None:
            frac["docs"] += stats["docs_read"]
            frac["chars"] += stats["chars"]
            # Bytes are estimated from characters (UTF-8 Chinese ≈ 3 bytes); exact at the end.
            bar.update(task, completed=min(total_bytes, frac["chars"] * 3), docs=frac["docs"])

        try:
            m = build_corpus(inputs, out, cfg, workers=workers, progress=on_shard)
        except (FileNotFoundError, FileExistsError, ValueError) as exc:
            _fail(str(exc))
        bar.update(task, completed=total_bytes)
    dt = time.perf_counter() - t0
    console.print(
        f"{out}: {m['docs_kept']:,} docs kept of {m['docs_read']:,} read, {m['tokens']:,} tokens, "
        f"{len(m['shards'])} shards ({m['shards_resumed']} resumed), {m['input_bytes'] / dt / 1e6:.2f} MB/s"
    )
    if m["docs_skipped"]:
        console.print(f"skipped: {m['docs_skipped']}")
    if m.get("entity_types"):
        console.print(f"entity mentions: {m['mentions']:,} ({m['entity_tokens']:,} tokens), types {m['entity_types'][1:]}")


@corpus_app.command("stats")
def corpus_stats(
    data: Annotated[Path, typer.Argument(help="A built corpus directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Document/sentence/word length distributions, POS tags, unknown-token rate."""
    from clueforge.corpus.shards import Corpus
    from clueforge.text.tokenizer import load_tokenizer

    try:
        corpus = Corpus(data)
    except FileNotFoundError as exc:
        _fail(str(exc))
    unk = load_tokenizer(data / "vocab.txt").token_to_id("[UNK]") if (data / "vocab.txt").is_file() else None
    stats = corpus.stats(unk)
    if as_json:
        print(json.dumps(stats, ensure_ascii=False, indent=2))
        return
    from rich.table import Table

    table = Table(title=str(data), show_header=False)
    for k, v in stats.items():
        table.add_row(k, json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else f"{v:,}" if isinstance(v, int) else str(v))
    Console().print(table)


@app.command()
def pretrain(
    config: Annotated[str, typer.Option(help="A shipped config name (tiny, mini, base) or a YAML file.")],
    data: Annotated[Path, typer.Option(help="Corpus directory from `corpus build`.")],
    out: Annotated[Path, typer.Option(help="Run directory; re-running on it resumes.")],
    max_steps: Annotated[Optional[int], typer.Option(help="Override train.max_steps.")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Override train.save_every.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override: model.KEY=V or train.KEY=V.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Pretrain a BERT-family encoder with (whole-word) masked language modelling."""
    from clueforge.pretrain.config import load_config
    from clueforge.pretrain.loop import pretrain as run, summary_line

    _logging()
    overrides = list(set_ or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if save_every is not None:
        overrides.append(f"train.save_every={save_every}")
    try:
        cfg = load_config(config, overrides)
        summary = run(cfg, data, out, show_progress=progress and sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if os.environ.get("RANK", "0") == "0":
        print(summary_line(summary))


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option(help="Where to put the vocab, corpus and run.")] = Path("runs/quickstart"),
    steps: Annotated[int, typer.Option(help="Pretraining steps for the tiny model.")] = 300,
) -> None:
    """The whole spine on the embedded sample corpus: vocab → shards → pretrain → HF checkpoint."""
    import shutil

    from clueforge.corpus.build import BuildConfig, build_corpus, iter_texts
    from clueforge.pretrain.config import load_config
    from clueforge.pretrain.loop import pretrain as run
    from clueforge.text.vocab import build_vocab

    _logging()
    out.mkdir(parents=True, exist_ok=True)
    cfg = BuildConfig(vocab="", doc_sep="blank", docs_per_shard=16)  # 4 shards; the last (13 docs) is held out
    vocab = out / "vocab.txt"
    n = build_vocab(iter_texts([SAMPLE], cfg), vocab, vocab_size=2000, min_frequency=1)
    console.print(f"[1/4] vocab: {n} entries → {vocab}")
    cfg.vocab = str(vocab)
    corpus_dir = out / "corpus"
    if corpus_dir.exists():
        shutil.rmtree(corpus_dir)
    m = build_corpus([SAMPLE], corpus_dir, cfg, workers=1)
    console.print(f"[2/4] corpus: {m['docs_kept']} docs, {m['tokens']:,} tokens, {len(m['shards'])} shards → {corpus_dir}")
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    pcfg = load_config("tiny", [f"train.max_steps={steps}", "train.eval_every=100", "train.save_every=100",
                                "train.warmup_steps=30"])
    summary = run(pcfg, corpus_dir, run_dir, show_progress=sys.stderr.isatty())
    console.print(f"[3/4] pretrained {summary['steps']} steps: held-out MLM loss {summary.get('eval_loss', float('nan')):.3f}, "
                  f"accuracy {summary.get('eval_mlm_acc', float('nan')):.3f} → {summary['final']}")
    _fill_mask_demo(Path(summary["final"]))


def _finetune_config(items: list[str] | None, seed: int | None = None):
    import yaml

    from clueforge.finetune.loop import FinetuneConfig
    from clueforge.pretrain.config import build_dataclass

    raw = {}
    for item in items or []:
        if "=" not in item:
            _fail(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        raw[k.strip()] = yaml.safe_load(v)
    if seed is not None:
        raw["seed"] = seed
    try:
        return build_dataclass(FinetuneConfig, raw, "--set")
    except ValueError as exc:
        _fail(str(exc))


@app.command()
def tasks() -> None:
    """List the task registry: family, metric, CLUE hyper-parameters, submission file."""
    from rich.table import Table

    from clueforge.tasks.registry import TASKS

    table = Table("task", "family", "metric", "epochs", "max len", "lr", "batch", "submission")
    for t in TASKS.values():
        table.add_row(t.name, t.family, t.metric, str(t.epochs), str(t.max_length), f"{t.lr:g}", str(t.batch_size),
                      t.submission)
    Console().print(table)


@app.command()
def finetune(
    task: Annotated[str, typer.Argument(help="Task name (see `clueforge tasks`).")],
    data: Annotated[Path, typer.Option(help="The task's folder in its official format.")],
    model: Annotated[Path, typer.Option(help="A clueforge or local Hugging Face BERT-family directory.")],
    out: Annotated[Path, typer.Option(help="Output directory (best/, results.json, metrics.jsonl).")],
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="FinetuneConfig override, e.g. lr=2e-5, rdrop=1.0.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Fine-tune on a task; dev scores each epoch; keep the best checkpoint."""
    from clueforge.finetune.loop import finetune as run
    from clueforge.tasks.io import TaskDataError

    _logging()
    cfg = _finetune_config(set_, seed)
    try:
        res = run(task, data, model, out, cfg, show_progress=progress and sys.stderr.isatty())
    except (KeyError, FileNotFoundError, TaskDataError, ValueError) as exc:
        _fail(str(exc).strip("'\""))
    print(json.dumps({"task": res["task"], "metric": res["metric"], "best_epoch": res["best_epoch"]}, ensure_ascii=False))


@app.command()
def predict(
    task: Annotated[str, typer.Argument(help="Task name.")],
    model: Annotated[Path, typer.Option(help="A checkpoint fine-tuned for TASK (its best/ folder).")],
    input: Annotated[str, typer.Option(help="The official test file (comma-separated for several).")],
    out: Annotated[Path, typer.Option(help="Prediction file in the leaderboard format.")],
    runtime: Annotated[str, typer.Option(help="torch (a fine-tuned checkpoint) or onnx (a `clueforge export` directory).")] = "torch",
) -> None:
    """Predict an official test file in the task's submission format."""
    from clueforge.tasks.io import TaskDataError

    _logging()
    try:
        n = _predict_runtime(task, model, input, out, runtime)
    except (KeyError, FileNotFoundError, TaskDataError, ValueError) as exc:
        _fail(str(exc).strip("'\""))
    console.print(f"wrote {n} predictions to {out}")


def _predict_runtime(task: str, model: Path, input: str, out: Path, runtime: str) -> int:
    import torch

    from clueforge.deploy.runtime import load_any
    from clueforge.finetune.loop import predict_with

    t, fam, state, m, tok = load_any(model, runtime, task)
    device = torch.device("cuda" if runtime == "torch" and torch.cuda.is_available() else "cpu")
    return predict_with(t, fam, state, m.to(device), tok, input, out, device=device)


@app.command("export")
def export_cmd(
    model: Annotated[Path, typer.Argument(help="A fine-tuned checkpoint (the best/ folder of `clueforge finetune`).")],
    out: Annotated[Path, typer.Option(help="Output directory (model.onnx, tokenizer, config, export_check.json).")],
    format: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    int8: Annotated[bool, typer.Option("--int8", help="Also write model.int8.onnx (dynamic int8) and run it by default.")] = False,
    data: Annotated[Optional[Path], typer.Option(help="The task's folder: check equivalence on its dev set (else on a random sample).")] = None,
    max_check: Annotated[int, typer.Option(help="Dev examples checked at most (a fixed random subset).")] = 1000,
) -> None:
    """Export the encoder and its task head to ONNX (optimised, optionally int8) and check it against PyTorch."""
    from clueforge.deploy.export import export_onnx
    from clueforge.tasks.io import TaskDataError

    _logging()
    try:
        rep = export_onnx(model, out, int8=int8, data=data, max_check=max_check, fmt=format)
    except (KeyError, FileNotFoundError, TaskDataError, ValueError, ImportError) as exc:
        _fail(str(exc).strip("'\""))
    for kind, row in rep["onnxruntime"].items():
        console.print(f"{kind}: {row['file']} max |Δlogit| {row['max_abs_logit_diff']:.2e}, label agreement "
                      f"{row['label_agreement']:.4f} ({row['labels_compared']} labels)")
    console.print(f"wrote {out} (checked on the {rep['checked_on']}; {out / 'export_check.json'})")
    if rep["onnxruntime"]["fp32"]["max_abs_logit_diff"] > 1e-3:
        console.print("[bold red]error:[/] the fp32 ONNX model differs from PyTorch by more than 1e-3")
        raise typer.Exit(1)


@app.command("serve")
def serve_cmd(
    model: Annotated[Path, typer.Argument(help="A fine-tuned checkpoint (torch) or a `clueforge export` directory (onnx).")],
    runtime: Annotated[str, typer.Option(help="torch or onnx.")] = "torch",
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Requests run together at most (1 = no batching).")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="How long the oldest waiting request may wait for a batch to fill.")] = 5.0,
    queue: Annotated[int, typer.Option(help="Requests admitted and not yet answered at most; more get 503.")] = 256,
    threads: Annotated[int, typer.Option(help="Compute threads (0 = the runtime's default).")] = 0,
) -> None:
    """Serve the model over HTTP (POST /predict, GET /health, GET /metrics) with dynamic batching."""
    from clueforge.deploy.serve import Backend, serve

    _logging()
    try:
        backend = Backend.load(model, runtime, threads)
        serve(model, host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms, queue=queue, backend=backend)
    except (KeyError, FileNotFoundError, ValueError, ImportError) as exc:
        _fail(str(exc).strip("'\""))


@app.command()
def submit(
    predictions: Annotated[Path, typer.Argument(help="Folder of *_predict.json files.")],
    data: Annotated[Path, typer.Option(help="Root holding the tasks' test files.")],
    out: Annotated[Optional[Path], typer.Option(help="Zip to write (default: PREDICTIONS/submission.zip).")] = None,
) -> None:
    """Validate prediction files against the test files (names, ids, labels) and zip them."""
    from clueforge.tasks.submit import validate_and_zip

    _logging()
    zip_path, problems = validate_and_zip(predictions, data, out)
    if problems:
        for p in problems[:50]:
            console.print(f"[red]✗[/] {p}")
        if len(problems) > 50:
            console.print(f"… and {len(problems) - 50} more")
        _fail(f"{len(problems)} problem(s); nothing zipped")
    console.print(f"all files valid → {zip_path}")


@app.command()
def benchmark(
    suite: Annotated[str, typer.Argument(help="clue1.1, fewclue or all-local.")],
    model: Annotated[Path, typer.Option(help="Model directory.")],
    data: Annotated[Path, typer.Option(help="Root holding the task folders.")],
    out: Annotated[Path, typer.Option(help="Output directory (report.json, report.md).")],
    seeds: Annotated[int, typer.Option(help="Seeds per task.")] = 3,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="FinetuneConfig override for every task.")] = None,
) -> None:
    """Fine-tune every task of a suite over seeds; report mean ± std beside published numbers."""
    from clueforge.tasks.suite import run_suite

    _logging()
    try:
        run_suite(suite, model, data, out, seeds, _finetune_config(set_), show_progress=sys.stderr.isatty())
    except KeyError as exc:
        _fail(str(exc).strip("'\""))
    print((out / "report.md").read_text(encoding="utf-8"))


def _fill_mask_demo(final: Path) -> None:
    """Load the checkpoint with transformers where installed (else clueforge) and fill a blank."""
    import torch

    text = "我们小区门口新开了一家[MASK]馆。"
    try:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(final)
        model = AutoModelForMaskedLM.from_pretrained(final).eval()
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits
        ids = enc["input_ids"][0]
        pos = int((ids == tok.mask_token_id).nonzero()[0])
        top = logits[0, pos].topk(5).indices.tolist()
        guesses = tok.convert_ids_to_tokens(top)
        loader = "transformers.AutoModelForMaskedLM"
    except ImportError:
        from clueforge.model.hf import load_hf
        from clueforge.text.tokenizer import load_tokenizer

        tok = load_tokenizer(final)
        model = load_hf(final).eval()
        enc = tok.encode(text)
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            logits = model(ids).logits
        pos = enc.ids.index(tok.token_to_id("[MASK]"))
        guesses = [tok.id_to_token(i) for i in logits[0, pos].topk(5).indices.tolist()]
        loader = "clueforge.model.load_hf"
    console.print(f"[4/4] {final} loaded with {loader}: {text} → top-5 {guesses}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
