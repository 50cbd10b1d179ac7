"""The agent's side of one ``bench_data`` measurement, in its own process.

``python -m bench.data_agent backup|restore PATH REPO``: what ``ec2-agent backup`` /
``restore`` run on an instance (``store_for``'s client, the lean botocore data the daemon
builds), without the bench harness's own imports in the measured process; it ends as the
command does (``agent.cli._FAST_EXIT``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

BUCKET = "bench-data"


def main(op: str, path: str, repo: str) -> int:
    from agent.data import backup as B

    lean = os.environ.get("BENCH_AWS_DATA")
    if lean:  # as on an instance whose daemon built them (ec2-agent backup/restore load them)
        from agent.aws import session as aws

        aws.use_data(lean)
    cfg = SimpleNamespace(store=SimpleNamespace(bucket=BUCKET, prefix=repo, region="us-east-1"))
    store = B.store_for(cfg)
    if op == "backup":
        B.Backup(store, "bench", "data", Path(path), instance_id="i-bench").run()
    else:
        from agent.data import restore as R

        R.restore(store, "bench", "data", Path(path))
    return 0


if __name__ == "__main__":
    code = main(*sys.argv[1:4])
    from agent import cli

    if sys.argv[1] in cli._FAST_EXIT:
        cli.exit_now(code)
    sys.exit(code)
