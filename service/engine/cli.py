"""The `llmpress` command line: compress a checkpoint, measure perplexity, run the bundled demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from service.engine.options import Calibration, CompressionOptions
from service.recipes.recipe import RecipeLimitError, load_recipe
from service.recipes.recipe_limits import DEFAULT_LIMITS, TRUSTED_LIMITS

REPO_ROOT = Path(__file__).resolve().parents[2]
# The bundled model and texts: the checkout's tests/fixtures, or where LLMPRESS_FIXTURES points (container images).
FIXTURES = Path(os.environ.get("LLMPRESS_FIXTURES", REPO_ROOT / "tests" / "fixtures"))
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# Bad input (recipe, paths, data, checkpoint) ends in one line naming the field; anything else keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError)


def add_option_flags(parser: argparse.ArgumentParser, options: type[BaseModel], names: Sequence[str], *,
                     defaults: bool = True) -> None:
    """A ``--kebab-case`` flag for each of the fields ``names`` of an options model: its description is the help,
    a bool is a switch, a Literal gives the choices, an int or float is parsed as one, and the field's default is
    the flag's (``defaults=False``: None, so the receiver's default applies). The flag's dest is the field's name,
    so ``{name: getattr(args, name)}`` builds the options back."""
    for name in names:
        field = options.model_fields[name]
        kinds = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
                 for a in (typing.get_args(field.annotation) or (field.annotation,)) if a is not type(None)]
        default = field.default if defaults else None
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:  # a switch; one that is on by default gets its --no-... form too
            action = argparse.BooleanOptionalAction if field.default else "store_true"
            parser.add_argument(flag, dest=name, action=action, default=field.default if defaults else None,
                                help=field.description)
        elif typing.get_origin(field.annotation) is typing.Literal:
            parser.add_argument(flag, dest=name, choices=kinds, default=default, help=field.description)
        else:
            kind = next((k for k in (int, float) if k in kinds), str)
            parser.add_argument(flag, dest=name, type=kind, default=default, help=field.description)


def _flags(args: argparse.Namespace, names: Sequence[str]) -> dict:
    return {name: getattr(args, name) for name in names}


# The options the compress command takes as flags of their own: the calibration's knobs (--dataset is its source)
# and every scalar option of CompressionOptions. A field added to either becomes a flag here.
CALIBRATION_FLAGS = tuple(n for n in Calibration.model_fields if n != "source")
OPTION_FLAGS = tuple(n for n in CompressionOptions.model_fields
                     if n not in ("model", "recipe", "output", "dataset", "evals"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpress", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every module's figures")
    sub = parser.add_subparsers(dest="command", required=True)
    fields = CompressionOptions.model_fields

    c = sub.add_parser("compress", help="compress a Hugging Face model directory with a recipe")
    c.add_argument("--model", required=True, help=fields["model"].description)
    c.add_argument("--recipe", required=True, help="recipe YAML file (llm-compressor format)")
    c.add_argument("--trusted-recipe", action="store_true",
                   help="raise the recipe limits (size, nesting, YAML aliases, nodes, modifiers) that the API "
                        "applies, for a recipe file you trust")
    c.add_argument("--output", required=True, help=fields["output"].description)
    c.add_argument("--dataset", help=Calibration.model_fields["source"].description)
    add_option_flags(c, Calibration, CALIBRATION_FLAGS)
    c.add_argument("--eval", action="append", default=[], metavar="TEXT",
                   help="evaluation text for perplexity before/after (repeatable)")
    c.add_argument("--eval-max-tokens", type=int, default=None, help="evaluate on at most this many tokens")
    add_option_flags(c, CompressionOptions, OPTION_FLAGS)
    c.add_argument("--report-json", help="also write the compression report here")

    e = sub.add_parser("eval", help="perplexity of a model over a text, in non-overlapping windows")
    e.add_argument("--model", required=True)
    e.add_argument("--dataset", required=True)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--json", action="store_true", help="print JSON")
    add_option_flags(e, CompressionOptions, ("device", "trust_remote_code", "allow_pickle"))

    d = sub.add_parser("demo", help="compress the bundled stories260K model with SparseGPT 2:4 and report quality")
    d.add_argument("--output", default=None, help="where the compressed model goes (default: a new folder under "
                                                  "artifacts/ for each run)")
    d.add_argument("--recipe", default=str(RECIPES / "sparsegpt_2of4.yaml"))
    add_option_flags(d, CompressionOptions, ("device",))
    return parser


def compression_options(args: argparse.Namespace) -> CompressionOptions:
    """The options of a parsed ``llmpress compress`` command line (OptionsError names a bad one)."""
    return CompressionOptions.parse({
        "model": args.model, "recipe": Path(args.recipe), "output": args.output,
        "dataset": None if args.dataset is None else {"source": args.dataset, **_flags(args, CALIBRATION_FLAGS)},
        "evals": [{"name": Path(p).stem, "source": p, "max_tokens": args.eval_max_tokens} for p in args.eval],
        **_flags(args, OPTION_FLAGS),
    })


def _compress(args) -> int:
    from service.engine.compress import compress_checkpoint

    options = compression_options(args)
    # The recipe file is held to the recipe limits here, where --trusted-recipe can raise them, and before the
    # model is opened; the engine takes the parsed Recipe as it is.
    try:
        recipe = load_recipe(options.recipe, limits=TRUSTED_LIMITS if args.trusted_recipe else DEFAULT_LIMITS)
    except RecipeLimitError as exc:
        if args.trusted_recipe:
            raise
        raise RecipeLimitError(f"{exc}; --trusted-recipe raises the limits for a recipe file you trust") from None
    report = compress_checkpoint(options.model_copy(update={"recipe": recipe}))
    if args.report_json:
        from service.engine.export import write_json

        write_json(Path(args.report_json), report)
    print(summary(report))
    return 0


def _eval(args) -> int:
    from service.engine.model_source import CheckpointError, SafetensorsCheckpoint, load_dense, resolve_model_dir
    from service.engine.perplexity import perplexity, perplexity_streamed
    from service.engine.pipeline import execution_device
    from service.engine.text_data import load_tokenizer, read_texts, tokenize

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
    model = FIXTURES / "models" / "stories260K"
    if not model.is_dir():
        raise FileNotFoundError(f"the bundled model is missing at {model}; run the demo from a repository checkout")
    data = FIXTURES / "data"
    print(f"llmpress demo: {model.name} with {Path(args.recipe).name}, calibration 128 x 256 tokens of WikiText-2")
    from service.engine.compress import compress_checkpoint

    report = compress_checkpoint(CompressionOptions(
        model=model, recipe=Path(args.recipe), output=args.output or "artifacts/demo-stories260K-2of4",
        dataset={"source": data / "wikitext-2" / "valid.txt", "num_samples": 128, "seq_len": 256},
        evals=[{"name": "wikitext-2", "source": data / "wikitext-2" / "test.txt", "max_tokens": 40960},
               {"name": "tinystories", "source": data / "tinystories" / "valid-subset.txt"}],
        device=args.device, overwrite=True,
    ))
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
