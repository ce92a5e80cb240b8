"""S3 streaming reads: each block read from S3 costs its own bytes in one GET, and the job keeps only side files.

For the stories260K model and a random-init fp32 Llama of 8 blocks (bench/make_random_llama.py: hidden 1024,
intermediate 2816, 49 MiB a block), uploads the model folder to a moto S3 server on 127.0.0.1 (loopback only),
then does what a job does with it: fetch_side_files into a work folder, S3Checkpoint on the URI,
StreamedModel(side files, checkpoint=...), and for each block loads its parameters and releases them. Prints, per
block, the bytes fetched and the GETs it took next to the block's own size, and the disk the job's model folder
takes (side files only) next to the whole model's size, as markdown tables.

    python3 bench/s3_streaming.py [--layers 8] [--hidden 1024] [--intermediate 2816] [--work bench/work]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

STORIES = REPO / "tests/fixtures/models/stories260K"
MIB = 2**20


def start_s3():
    """A moto S3 server on a free loopback port, with the standard AWS variables pointing boto3 at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        os.environ.pop(name, None)
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1",
                      AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials", AWS_CONFIG_FILE="/nonexistent/config",
                      AWS_EC2_METADATA_DISABLED="true")
    return server


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(label: str, folder: Path, uri: str) -> dict:
    """Upload ``folder`` to ``uri``, then stream it block by block as a job would; the figures."""
    from service.engine.model_source import StreamedModel
    from service.jobs.s3_checkpoint import S3Checkpoint, fetch_side_files
    from service.jobs.storage import open_store
    from service.recipes.targets import find_blocks

    open_store(uri, field="model").upload_dir(folder)
    with tempfile.TemporaryDirectory(prefix="llmpress-s3bench-") as work:
        side = fetch_side_files(uri, Path(work) / "model")
        side_bytes = folder_bytes(side)
        checkpoint = S3Checkpoint(uri)
        opening = (checkpoint.requests, checkpoint.bytes_read)  # the LIST and the header GETs
        source = StreamedModel(side, checkpoint=checkpoint)
        blocks = []
        block_names = [name for name, _ in find_blocks(source.model)]
        inside = {n for name in block_names for n in source.parameter_names(name)}
        outside = [n for n in source.parameter_names() if n not in inside]
        for name, names in [(b, source.parameter_names(b)) for b in block_names] + [("outside blocks", outside)]:
            requests, read, start = checkpoint.requests, checkpoint.bytes_read, time.perf_counter()
            source.load(names, "cpu")
            seconds = time.perf_counter() - start
            own = sum(source.model.get_parameter(n).nbytes for n in names)
            blocks.append({"block": name, "own": own, "read": checkpoint.bytes_read - read,
                           "gets": checkpoint.requests - requests, "seconds": seconds})
            source.release(names)
    return {"model": label, "model_bytes": folder_bytes(folder), "side_bytes": side_bytes, "opening": opening,
            "blocks": blocks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--work", type=Path, default=BENCH / "work")
    a = ap.parse_args(argv)
    from make_random_llama import write_model

    random_dir = a.work / f"random-llama-{a.layers}l-{a.hidden}h"
    if not (random_dir / "config.json").exists():
        write_model(random_dir, layers=a.layers, hidden=a.hidden, intermediate=a.intermediate)
    server = start_s3()
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        results = [measure("stories260K", STORIES, "s3://bench/stories260K/"),
                   measure(f"random Llama, {a.layers} blocks", random_dir, "s3://bench/random-llama/")]
    finally:
        server.stop()

    print("\n| model | block | block's own bytes | bytes read | GETs | read ms (loopback) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        for b in r["blocks"]:
            print(f"| {r['model']} | {b['block']} | {b['own']:,} | {b['read']:,} | {b['gets']} | "
                  f"{b['seconds'] * 1000:.0f} |")
    print("\n| model | whole model folder | job's model folder on disk (side files) | opening: requests, bytes |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['model_bytes'] / MIB:,.2f} MiB | {r['side_bytes'] / 1024:,.1f} KiB | "
              f"{r['opening'][0]}, {r['opening'][1]:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
