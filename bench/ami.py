#!/usr/bin/env python3
"""AMI publication speed: EBS direct-API upload against a loopback moto server.

Builds a sparse raw disk shaped like the appliance's (mostly holes, some
allocated-but-zeroed space as sysprep leaves it, the rest data), uploads it
with tether.image.ebsupload, and reports MiB/s of data actually sent, the
disk's apparent MiB/s, and the share of blocks skipped as zero. Writes
bench/results/ami.json. Loopback only: moto runs in this process on 127.0.0.1.

The figure measures the publisher (reading, hashing, zero detection, thread
pool, boto3 signing) plus moto's request handling, not AWS's network path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from moto.moto_server.threaded_moto_server import ThreadedMotoServer

from tether.image.ami import Aws
from tether.image.ebsupload import BLOCK_SIZE, SnapshotUploader

RESULTS = Path(__file__).resolve().parent / "results" / "ami.json"
MIB = 1024 * 1024


def make_disk(path: Path, disk_mib: int, data_mib: int, zeroed_mib: int) -> None:
    """Sparse disk: `data_mib` of pseudo-random data and `zeroed_mib` of written zeros,
    spread over the disk in 4 MiB runs the way a filesystem spreads files."""
    run = 4 * MIB
    runs = max(1, disk_mib * MIB // run)
    with open(path, "wb") as disk:
        disk.truncate(disk_mib * MIB)
        data_runs, zero_runs = data_mib * MIB // run, zeroed_mib * MIB // run
        step = max(1, runs // max(1, data_runs + zero_runs))
        for n in range(data_runs + zero_runs):
            disk.seek((n * step % runs) * run)
            disk.write(os.urandom(run) if n < data_runs else bytes(run))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk-mib", type=int, default=2048)
    parser.add_argument("--data-mib", type=int, default=128)
    parser.add_argument("--zeroed-mib", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="eu-central-1")
    os.environ.pop("AWS_PROFILE", None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per block otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        aws = Aws.from_environment(endpoint_url=f"http://{host}:{port}", workers=args.workers)
        with tempfile.TemporaryDirectory(prefix="tether-bench-ami-") as tmp:
            raw = Path(tmp) / "bench.raw"
            make_disk(raw, args.disk_mib, args.data_mib, args.zeroed_mib)
            started = time.perf_counter()
            stats = SnapshotUploader(aws.ebs, aws.ec2, workers=args.workers,
                                     progress=None).upload(raw)
            seconds = time.perf_counter() - started
    finally:
        server.stop()

    result = {
        "disk_mib": args.disk_mib, "data_mib": args.data_mib, "zeroed_mib": args.zeroed_mib,
        "workers": args.workers, "block_size": BLOCK_SIZE,
        "blocks_total": stats.total_blocks, "blocks_sent": stats.sent_blocks,
        "blocks_skipped_zero": stats.zero_blocks,
        "zero_share": round(stats.zero_share, 4),
        "seconds": round(seconds, 3),
        "sent_mib_per_s": round(stats.sent_bytes / MIB / seconds, 1),
        "disk_mib_per_s": round(args.disk_mib / seconds, 1),
        "cpu_count": os.cpu_count(),
    }
    print(f"ami upload: {stats.sent_blocks} of {stats.total_blocks} blocks sent "
          f"({stats.sent_bytes / MIB:.0f} MiB) in {seconds:.2f} s with {args.workers} workers")
    print(f"  data sent:  {result['sent_mib_per_s']} MiB/s")
    print(f"  disk speed: {result['disk_mib_per_s']} MiB/s of apparent disk size")
    print(f"  skipped as zero: {stats.zero_blocks} blocks ({stats.zero_share:.1%})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
