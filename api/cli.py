"""The `llmpress` command line: the engine's commands (compress, eval, demo) plus the service's.

    llmpress demo [--engine]                             the bundled model through the service's REST API
    llmpress serve [--host 127.0.0.1] [--port 8000]      the API with local Ray, SQLite and ./artifacts by default
    llmpress submit --server URL --model M --recipe FILE --output OUT [--dataset D] [--eval E --max-ppl-ratio R]
                    [--workers N [--cpus-per-worker C] [--gpus-per-worker 0|1]]
                    [--wait]                              prints the job id; --wait follows it
    llmpress jobs list|get|cancel                         the jobs of your key
    llmpress retry JOB_ID                                 queue a failed or cancelled job again
    llmpress keys create --name NAME [--admin]            prints the new key's secret, once

Exit codes of submit --wait: 0 the job succeeded (and passed its quality gate), 1 it failed, failed its gate or was
cancelled, 2 bad usage or an error from the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from api.schemas import DatasetSpec
from service.engine import cli as service_cli
from service.jobs.request import Resources

SERVICE_COMMANDS = ("compress", "eval", "demo")
DATASET_FLAGS = tuple(name for name in DatasetSpec.model_fields if name != "source")
RESOURCES_FLAGS = tuple(Resources.model_fields)
DEFAULT_SERVER = "http://127.0.0.1:8000"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get("LLMPRESS_SERVER", DEFAULT_SERVER),
                        help=f"API base URL (default: LLMPRESS_SERVER or {DEFAULT_SERVER})")
    parser.add_argument("--api-key", default=None, help="API key (default: LLMPRESS_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = service_cli.build_parser()
    parser.description = __doc__.split("\n")[0]
    sub = _subparsers(parser)

    d = sub.choices["demo"]
    d.description = ("Start the service in this process (local Ray, the SQLite job store, the artifacts folder), "
                     "submit the bundled stories260K model through its REST API with the recipe, follow the job, "
                     "then print where the artifacts are and the report.")
    d.add_argument("--engine", action="store_true",
                   help="run the engine directly instead, without the service (no Ray, no REST)")
    d.add_argument("--port", type=int, default=0, help="port for the demo's API (default: a free one)")

    s = sub.add_parser("serve", help="run the job API (local Ray, SQLite and ./artifacts unless configured)")
    s.add_argument("--host", default=None, help="interface to listen on (default: LLMPRESS_HOST or 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="TCP port (default: LLMPRESS_PORT or 8000)")

    j = sub.add_parser("submit", help="submit a compression job to a server; prints its id")
    _add_connection(j)
    j.add_argument("--model", required=True, help="s3://bucket/prefix, a folder under the server's artifacts "
                                                  "folder, or a Hub id")
    j.add_argument("--recipe", required=True, help="recipe file (YAML in llm-compressor's format, or JSON)")
    j.add_argument("--dataset", help="calibration text (s3://bucket/key or a path the server can read)")
    # One flag per calibration field of the HTTP contract, unset unless given (the server's defaults apply).
    service_cli.add_option_flags(j, DatasetSpec, DATASET_FLAGS, defaults=False)
    j.add_argument("--output", required=True, help="s3://bucket/prefix/ or a folder under the server's artifacts")
    j.add_argument("--overwrite", action="store_true",
                   help="replace the output of your own succeeded job at exactly this location")
    j.add_argument("--eval", help="evaluation text for the quality gate")
    j.add_argument("--max-ppl-ratio", type=float, help="fail the job when compressed/dense perplexity exceeds this")
    j.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label the job (repeatable)")
    j.add_argument("--webhook-url", help="POST the job here on every terminal state")
    j.add_argument("--webhook-secret", default=None,
                   help="HMAC key for the webhook signature (default: LLMPRESS_WEBHOOK_SECRET)")
    # --workers, --gpus-per-worker, --cpus-per-worker: the request's resources, sent only when one is given.
    service_cli.add_option_flags(j, Resources, RESOURCES_FLAGS, defaults=False)
    j.add_argument("--idempotency-key", help="makes a retried submit return the same job")
    j.add_argument("--wait", action="store_true", help="follow the job; exit 0 only if it succeeded")
    j.add_argument("--poll", type=float, default=1.0, help="seconds between status checks with --wait")

    jobs = sub.add_parser("jobs", help="list, show or cancel jobs").add_subparsers(dest="jobs_command",
                                                                                  required=True)
    jl = jobs.add_parser("list", help="your jobs, newest first")
    _add_connection(jl)
    jl.add_argument("--status", action="append", help="only this status (repeatable)")
    jl.add_argument("--label", action="append", metavar="KEY=VALUE", help="only with this label (repeatable)")
    jl.add_argument("--limit", type=int, default=50)
    jl.add_argument("--cursor", help="next_cursor of a previous page")
    jl.add_argument("--json", action="store_true", help="print the page as JSON")
    for name, what in (("get", "print a job as JSON"), ("cancel", "cancel a job")):
        p = jobs.add_parser(name, help=what)
        _add_connection(p)
        p.add_argument("job_id")

    r = sub.add_parser("retry", help="queue a failed or cancelled job again (attempt + 1); prints it as JSON")
    _add_connection(r)
    r.add_argument("job_id")

    keys = sub.add_parser("keys", help="manage API keys in the job store").add_subparsers(dest="keys_command",
                                                                                        required=True)
    kc = keys.add_parser("create", help="create a key; its secret is printed once and stored only hashed")
    kc.add_argument("--name", required=True, help="the key's name: the tenant that owns its jobs")
    kc.add_argument("--admin", action="store_true", help="the key sees and cancels every tenant's jobs")
    keys.add_parser("list", help="the keys' names (never their secrets)")
    return parser


def _client(args):
    from api.client import Client

    key = args.api_key or os.environ.get("LLMPRESS_API_KEY")
    if not key:
        raise SystemExit(f"llmpress {args.command}: error: no API key: pass --api-key or set LLMPRESS_API_KEY")
    return Client(args.server, key)


def _serve(args) -> int:
    import uvicorn

    import ray

    from api.app import build_app
    from service.jobs.settings import get_settings
    from workers.dispatch import connect_ray

    settings = get_settings()
    updates = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=updates)
    Path(settings.artifacts_root).mkdir(parents=True, exist_ok=True)
    # The port first, before Ray: a local Ray starts a dozen processes that each take a free port of their own (its
    # metrics agent among them), and one of them could take ours while it is still unbound. A port already in use
    # is then an error at once, not after Ray started; port 0 takes a free one, which the log line below names.
    sock = _listen(settings.host, settings.port)
    settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    print(f"llmpress serve: listening on http://{_url_host(settings.host)}:{settings.port}", flush=True)
    # Ray from the main thread and before uvicorn: uvicorn then installs its own SIGTERM/SIGINT handlers over
    # Ray's (which would exit at once), so a stop signal shuts the API down gracefully.
    connect_ray(settings)
    try:
        config = uvicorn.Config(build_app(settings), host=settings.host, port=settings.port, log_level="info")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        ray.shutdown()
    return 0


def _listen(host: str, port: int):
    """A listening TCP socket on ``host``:``port`` (an IPv6 address when ``host`` has a colon), or SystemExit naming
    the address when it cannot be had."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn binds: a restarted server may take its port while the old connections are in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise SystemExit(f"llmpress serve: error: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


DEMO_GATE = 2.0  # max perplexity ratio of the demo's quality gate: SparseGPT 2:4 on stories260K gives about 1.5


def _demo(args) -> int:
    """The README's main command: the whole service path (REST -> job store -> Ray worker -> engine -> artifacts)
    on the bundled model, with embedded defaults."""
    import secrets
    from datetime import datetime, timezone

    import ray
    from pydantic import SecretStr

    from api.app import build_app
    from api.client import Client
    from api.embedded import EmbeddedServer
    from service.engine.cli import FIXTURES, summary
    from service.jobs.settings import get_settings
    from workers.dispatch import connect_ray

    model = FIXTURES / "models" / "stories260K"
    if not model.is_dir():
        raise FileNotFoundError(f"the bundled model is missing at {model}; run the demo from a repository checkout")
    data = FIXTURES / "data"
    secret = secrets.token_urlsafe(32)  # this run's own key: the demo never needs one configured
    settings = get_settings()
    settings = settings.model_copy(update={
        "api_keys": {**settings.api_keys, "demo": SecretStr(secret)},
        "input_roots": (*settings.input_roots, str(FIXTURES)),
        "host": "127.0.0.1", "port": args.port or settings.port,
    })
    Path(settings.artifacts_root).mkdir(parents=True, exist_ok=True)
    output = args.output or f"demo/stories260K-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    connect_ray(settings)  # from the main thread (Ray's signal handlers), before the API's thread uses it
    try:
        with EmbeddedServer(build_app(settings), port=args.port) as url:
            print(f"llmpress demo: the service is up at {url} (job store {settings.database_url}, artifacts in "
                  f"{Path(settings.artifacts_root).resolve()})", flush=True)
            client = Client(url, secret)
            job = client.submit(
                model=str(model), recipe=Path(args.recipe).read_text(), output=output,
                dataset={"source": str(data / "wikitext-2" / "valid.txt"), "num_samples": 128, "seq_len": 256},
                eval={"source": str(data / "wikitext-2" / "test.txt"), "max_ppl_ratio": DEMO_GATE,
                      "max_tokens": 40960},
                labels={"source": "llmpress-demo"},
            )
            print(f"submitted job {job.id} (POST {url}/v1/jobs): {model.name}, {Path(args.recipe).name}, "
                  f"calibration 128 x 256 tokens of WikiText-2, gate: perplexity ratio <= {DEMO_GATE}", flush=True)
            job = client.wait(job.id, poll=0.5,
                              on_progress=lambda j: print("  " + _progress_line(j), flush=True))
    finally:
        ray.shutdown()
    if job.status != "succeeded":
        print(f"job {job.id} {job.status}: {job.error}", file=sys.stderr)
        return 1
    print(summary(job.report))
    manifest = job.artifacts.manifest
    print(f"artifacts: {job.artifacts.uri} ({len(manifest.files)} files, {manifest.total_size:,} bytes; "
          f"{manifest.key} lists each with its sha256)")
    return 0


def _read_recipe(path: str) -> str | list:
    text = Path(path).read_text()
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, list) else text  # a JSON object is also valid YAML text


def _progress_line(job) -> str:
    p = job.progress
    if job.status in ("succeeded", "failed", "cancelled"):
        return f"{job.id} {job.status}"
    if job.status == "queued" and p.waiting:
        return f"{job.id} queued: {p.waiting}"
    where = f" {p.stage}" if p.stage else ""
    if p.layer is not None and p.layers:
        where += f" layer {p.layer}/{p.layers}"
    if p.fraction is not None:
        where += f" ({p.fraction:.0%})"
    return f"{job.id} {job.status}{where}"


def _submit(args) -> int:
    client = _client(args)
    dataset = None
    if args.dataset:
        dataset = {"source": args.dataset}
        dataset.update({name: getattr(args, name) for name in DATASET_FLAGS if getattr(args, name) is not None})
    gate = None
    if args.eval or args.max_ppl_ratio is not None:
        if not (args.eval and args.max_ppl_ratio is not None):
            raise SystemExit("llmpress submit: error: --eval and --max-ppl-ratio go together")
        gate = {"source": args.eval, "max_ppl_ratio": args.max_ppl_ratio}
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"llmpress submit: error: --label {item!r} is not KEY=VALUE")
        labels[key] = value
    webhook = None
    if args.webhook_url:
        secret = args.webhook_secret or os.environ.get("LLMPRESS_WEBHOOK_SECRET")
        if not secret:
            raise SystemExit("llmpress submit: error: --webhook-url needs --webhook-secret or LLMPRESS_WEBHOOK_SECRET")
        webhook = {"url": args.webhook_url, "secret": secret}
    resources = {name: getattr(args, name) for name in RESOURCES_FLAGS if getattr(args, name) is not None}
    job = client.submit(model=args.model, recipe=_read_recipe(args.recipe), output=args.output, dataset=dataset,
                        eval=gate, labels=labels or None, webhook=webhook, idempotency_key=args.idempotency_key,
                        overwrite=args.overwrite, resources=resources or None)
    print(job.id, flush=True)
    if not args.wait:
        return 0
    job = client.wait(job.id, on_progress=lambda j: print(_progress_line(j), file=sys.stderr, flush=True),
                      poll=args.poll)
    gate_report = (job.report or {}).get("quality_gate")
    if job.status == "succeeded" and (gate_report is None or gate_report.get("passed")):
        if job.artifacts is not None:
            print(f"{job.id} succeeded: {job.artifacts.uri}", file=sys.stderr)
        return 0
    print(f"{job.id} {job.status}: {job.error or 'quality gate not passed'}", file=sys.stderr)
    return 1


def _jobs(args) -> int:
    client = _client(args)
    if args.jobs_command == "list":
        page = client.list(status=args.status, label=args.label, limit=args.limit, cursor=args.cursor)
        if args.json:
            print(page.model_dump_json(indent=2))
            return 0
        for job in page.items:
            print(f"{job.id}  {job.status:<10} {job.created_at:%Y-%m-%d %H:%M:%S}  {job.request.model} -> "
                  f"{job.request.output}")
        if page.next_cursor:
            print(f"more: --cursor {page.next_cursor}", file=sys.stderr)
        return 0
    job = client.get(args.job_id) if args.jobs_command == "get" else client.cancel(args.job_id)
    print(job.model_dump_json(indent=2))
    return 0


def _retry(args) -> int:
    print(_client(args).retry(args.job_id).model_dump_json(indent=2))
    return 0


def _keys(args) -> int:
    from service.jobs.api_keys import create_key, list_keys
    from service.jobs.job_store import JobStore
    from service.jobs.settings import get_settings

    settings = get_settings()
    store = JobStore(settings.database_url)
    try:
        if args.keys_command == "create":
            print(create_key(store, args.name, admin=args.admin))
            print(f"key {args.name!r} created{' (admin)' if args.admin else ''}; the secret above is shown only "
                  "this once", file=sys.stderr)
        else:
            for key in list_keys(store, settings):
                print(f"{key.name}  {'admin' if key.admin else 'user '}  {key.source}")
    finally:
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command in SERVICE_COMMANDS and not (args.command == "demo" and not args.engine):
        return service_cli.main([a for a in argv if a != "--engine"])
    from api.client import ApiError

    handlers = {"serve": _serve, "submit": _submit, "jobs": _jobs, "retry": _retry, "keys": _keys, "demo": _demo}
    try:
        return handlers[args.command](args)
    except (ApiError, OSError, ValueError) as exc:
        print(f"llmpress {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
