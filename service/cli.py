"""The `llmpress` command line: compress a checkpoint, measure perplexity, run the bundled demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The bundled model and texts: the checkout's tests/fixtures, or where LLMPRESS_FIXTURES points (container images).
FIXTURES = Path(os.environ.get("LLMPRESS_FIXTURES", REPO_ROOT / "tests" / "fixtures"))
RECIPES = Path(__file__).resolve().parent / "recipes"
# Bad input (recipe, paths, data, checkpoint) ends in one line naming the field; anything else keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError)


def _add_model_safety(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with the model (off by default)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickle (.bin) checkpoints, which can run code when loaded (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpress", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every module's figures")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a Hugging Face model directory with a recipe")
    c.add_argument("--model", required=True, help="model directory (or a Hub id, downloaded when online)")
    c.add_argument("--recipe", required=True, help="recipe YAML file (llm-compressor format)")
    c.add_argument("--dataset", help="calibration text: .txt, .jsonl with a 'text' field, or a saved datasets dir")
    c.add_argument("--num-samples", type=int, default=128)
    c.add_argument("--seq-len", type=int, default=512)
    c.add_argument("--output", required=True, help="output directory (published atomically)")
    c.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--sampling", choices=("head", "random"), default="head",
                   help="calibration windows from the start of the text, or drawn at random with --seed")
    c.add_argument("--batch-size", type=int, default=None, help="calibration samples per batch (default: ~4096 tokens)")
    c.add_argument("--pipeline", choices=("one_pass", "two_pass"), default="two_pass",
                   help="two_pass: calibrate on the dense block (SparseGPT paper, llm-compressor); one_pass: true sequential, one forward per block")
    c.add_argument("--eval", action="append", default=[], metavar="TEXT",
                   help="evaluation text for perplexity before/after (repeatable)")
    c.add_argument("--eval-max-tokens", type=int, default=None)
    c.add_argument("--eval-seq-len", type=int, default=512)
    c.add_argument("--report-json", help="also write the compression report here")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_model_safety(c)

    e = sub.add_parser("eval", help="perplexity of a model over a text, in non-overlapping windows")
    e.add_argument("--model", required=True)
    e.add_argument("--dataset", required=True)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    e.add_argument("--json", action="store_true", help="print JSON")
    _add_model_safety(e)

    d = sub.add_parser("demo", help="compress the bundled stories260K model with SparseGPT 2:4 and report quality")
    d.add_argument("--output", default=None, help="where the compressed model goes (default: a new folder under "
                                                  "artifacts/ for each run)")
    d.add_argument("--recipe", default=str(RECIPES / "sparsegpt_2of4.yaml"))
    d.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    return parser


def _compress(args) -> int:
    from service.oneshot import EvalSet, compress_checkpoint

    evals = [EvalSet(Path(p).stem, p, args.eval_max_tokens) for p in args.eval]
    report = compress_checkpoint(
        args.model, Path(args.recipe), args.output, dataset=args.dataset, num_samples=args.num_samples,
        seq_len=args.seq_len, seed=args.seed, sampling=args.sampling, batch_size=args.batch_size,
        device=args.device, pipeline=args.pipeline, trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle, evals=evals, eval_seq_len=args.eval_seq_len, overwrite=args.overwrite,
    )
    if args.report_json:
        from service.export import write_json

        write_json(Path(args.report_json), report)
    print(summary(report))
    return 0


def _eval(args) -> int:
    from service.model_source import CheckpointError, SafetensorsCheckpoint, resolve_model_dir
    from service.oneshot import execution_device, load_dense
    from service.perplexity import perplexity, perplexity_streamed
    from service.text_data import load_tokenizer, read_texts, tokenize

    device = execution_device(args.device)
    model_dir = resolve_model_dir(args.model, allow_pickle=args.allow_pickle)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=args.trust_remote_code)
    ids = tokenize(tokenizer, read_texts(args.dataset), max_tokens=args.max_tokens)
    try:
        SafetensorsCheckpoint(model_dir)
    except CheckpointError:
        if not args.allow_pickle:
            raise
        # Pickle weights cannot be read lazily: load the whole model (only because --allow-pickle was given).
        model = load_dense(model_dir, device, args.trust_remote_code)
        result = perplexity(model, ids, seq_len=args.seq_len, batch_size=args.batch_size, device=device)
    else:
        result = perplexity_streamed(model_dir, ids, seq_len=args.seq_len, batch_size=args.batch_size, device=device,
                                     trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps({"model": str(args.model), "dataset": str(args.dataset), "seq_len": args.seq_len,
                          "ppl": result.ppl, "nll": result.nll, "tokens": result.tokens, "windows": result.windows}))
    else:
        print(f"perplexity {result.ppl:.4f} over {result.tokens} tokens in {result.windows} windows of {args.seq_len}")
    return 0


def _demo(args) -> int:
    from service.oneshot import EvalSet, compress_checkpoint

    model = FIXTURES / "models" / "stories260K"
    if not model.is_dir():
        raise FileNotFoundError(f"the bundled model is missing at {model}; run the demo from a repository checkout")
    data = FIXTURES / "data"
    evals = [EvalSet("wikitext-2", data / "wikitext-2" / "test.txt", 40960),
             EvalSet("tinystories", data / "tinystories" / "valid-subset.txt")]
    print(f"llmpress demo: {model.name} with {Path(args.recipe).name}, calibration 128 x 256 tokens of WikiText-2")
    report = compress_checkpoint(
        model, Path(args.recipe), args.output or "artifacts/demo-stories260K-2of4", dataset=data / "wikitext-2" /
        "valid.txt", num_samples=128,
        seq_len=256, device=args.device, evals=evals, overwrite=True,
    )
    print(summary(report))
    return 0


def summary(report: dict) -> str:
    """A person's view of a report: per-block sparsity, totals, perplexities, where the model is."""
    lines = [f"recipe: {report.get('recipe', '')}"]
    for layer in report["layers"]:
        losses = [m["loss"] for m in report["modules"].values() if m["layer"] == layer["index"] and "loss" in m]
        loss = f"  loss {sum(losses):.4g}" if losses else ""
        lines.append(f"  {layer['name']:<28} sparsity {layer['sparsity']:.3f}{loss}  {layer['seconds']:.2f} s")
    t = report["totals"]
    lines.append(f"total: sparsity {t['sparsity']:.4f} of {t['params_targeted']:,} targeted weights, "
                 f"{t.get('wall_seconds', t['seconds']):.1f} s")
    for name, p in (report.get("perplexity") or {}).items():
        lines.append(f"perplexity {name}: {p['before']:.3f} -> {p['after']:.3f} (x{p['ratio']:.3f})")
    if "output" in report:
        lines.append(f"output: {report['output']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers = {"compress": _compress, "eval": _eval, "demo": _demo}
    try:
        return handlers[args.command](args)
    except USER_ERRORS as exc:
        print(f"llmpress {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
