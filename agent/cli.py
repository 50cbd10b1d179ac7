"""The command line: thin, it calls the library and maps its errors to exit codes.

argparse, not click, and every subcommand imports what it needs inside its
handler: ``ec2-agent status`` must start in milliseconds and never load boto3.
``AgentError`` -> message on stderr and its ``exit_code`` (1); usage errors -> 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from agent import __version__
from agent.errors import AgentError

Handler = Callable[[argparse.Namespace], int]


def _paths() -> Any:
    from agent.paths import Paths

    return Paths.from_env()


# -- status -------------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    from agent import status
    from agent.host import state as statefile

    paths = _paths()
    if args.wait:
        st = statefile.wait_final(paths.state_file, args.timeout)
        if not st or st.get("status") not in statefile.FINAL:
            report = status.translate(st)
            _print_status(report, args.json)
            print(f"ec2-agent: status --wait timed out after {args.timeout}s "
                  f"(status {report.status})", file=sys.stderr)
            return 1
    else:
        st = statefile.read(paths.state_file)
    report = status.translate(st)
    _print_status(report, args.json)
    return report.exit_code


def _print_status(report: Any, as_json: bool) -> None:
    from agent import status

    if as_json:
        print(json.dumps(report.to_json(), indent=1, sort_keys=True, default=str))
    else:
        print(status.format_text(report))


# -- boot ---------------------------------------------------------------------------------------

def cmd_boot(args: argparse.Namespace) -> int:
    from agent import status
    from agent.boot.run import run_boot

    st = run_boot(_paths())
    report = status.translate(st)
    if not args.quiet:
        print(status.format_text(report))
    return report.exit_code


# -- run ----------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon.loop import main as daemon_main

    return daemon_main(_paths())


# -- config -------------------------------------------------------------------------------------

def cmd_config_validate(args: argparse.Namespace) -> int:
    from agent.config.model import validate_file

    errors = validate_file(args.file, launch_index=args.launch_index)
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        return 1
    print(f"{args.file}: valid")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from agent.config.memo import config_on_host
    from agent.config.model import redact
    from agent.config.userdata import Metadata

    if args.user_data:
        from agent.config.udtemplate import EXAMPLE_INSTANCE_DATA
        from agent.config.userdata import StaticMetadata

        with open(args.user_data, "rb") as f:  # like `config validate`: stand-in metadata
            raw = f.read()
        metadata: Metadata = StaticMetadata(None, EXAMPLE_INSTANCE_DATA)
    else:
        from agent.aws.imds import ImdsClient, ImdsMetadata

        imds = ImdsClient()
        raw = imds.user_data()
        metadata = ImdsMetadata(imds)
    cfg = config_on_host(_paths(), raw, metadata)
    print(yaml.safe_dump(redact(cfg.raw), sort_keys=False, default_flow_style=False), end="")
    return 0


# -- membership ---------------------------------------------------------------------------------

def cmd_peers(args: argparse.Namespace) -> int:
    from agent.group.heartbeat import member_store
    from agent.group.peers import format_peers, read_group

    store, doc = member_store(_paths())
    peers, _ = read_group(store, doc["group"])
    if args.json:
        print(json.dumps([p.to_json() for p in peers], indent=1, sort_keys=True))
    else:
        print(format_peers(peers))
    return 0


def cmd_leave(args: argparse.Namespace) -> int:
    from agent.group.heartbeat import leave_group

    deleted = leave_group(_paths(), args.reason)
    print("left the group" if deleted else
          "marked leaving; the record could not be deleted (peers will not replace it)")
    return 0 if deleted else 1


def cmd_events(args: argparse.Namespace) -> int:
    from agent.group.events import format_events, list_events
    from agent.group.heartbeat import member_store

    store, doc = member_store(_paths())
    events = list_events(store, doc["group"], args.limit)
    if args.json:
        print(json.dumps([e.to_json() for e in events], indent=1, sort_keys=True))
    else:
        print(format_events(events))
    return 0


def _operator(doc: dict[str, Any]) -> str:
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{doc.get('instance_id', '?')}"


def cmd_pause(args: argparse.Namespace) -> int:
    from agent.group.heartbeat import member_store
    from agent.heal.leases import pause

    store, doc = member_store(_paths())
    pause(store, doc["group"], _operator(doc), args.reason)
    print(f"paused: no peer in {doc['group']} replaces anything until `ec2-agent resume`")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from agent.group.heartbeat import member_store
    from agent.heal.leases import resume

    store, doc = member_store(_paths())
    resume(store, doc["group"], _operator(doc), args.reason)
    print(f"resumed: {doc['group']} heals again; earlier failed replacements no longer count")
    return 0


# -- bundle -------------------------------------------------------------------------------------

def cmd_bundle_push(args: argparse.Namespace) -> int:
    from agent.aws.store import Store
    from agent.bundle.publish import push
    from agent.config.model import load_yaml_file
    from agent.errors import ConfigError

    paths = _paths()
    local = load_yaml_file(paths.config_file) if paths.config_file.exists() else {}
    store_cfg = local.get("store") or {}
    group = args.group or local.get("group")
    bucket = args.bucket or store_cfg.get("bucket")
    prefix = store_cfg.get("prefix", "") if args.prefix is None else args.prefix
    if not group or not bucket:
        raise ConfigError("bundle push needs --group and --bucket (no local config sets them)")
    store = Store(bucket, prefix, region=args.region or store_cfg.get("region"))
    print(push(store, group, args.dir).summary())
    return 0


# -- data ---------------------------------------------------------------------------------------

def cmd_backup(args: argparse.Namespace) -> int:
    from agent.data.backup import (
        TtyProgress,
        load_runtime,
        run_backups,
        store_for,
        use_lean_aws_data,
    )

    paths = _paths()
    use_lean_aws_data(paths)
    cfg, instance_id = load_runtime(paths)
    bar = TtyProgress("backup")
    outcomes = run_backups(store_for(cfg), cfg, paths, instance_id=instance_id,
                           final=args.final, only=args.name, progress=bar)
    bar.done()
    failed = 0
    for o in outcomes:
        if o.result is not None:
            print(o.result.summary())
        else:
            failed += 1
            print(f"ec2-agent: backup {o.name}: {o.error}", file=sys.stderr)
    if not outcomes:
        print("no data entries to back up")
    return 1 if failed else 0


def cmd_restore(args: argparse.Namespace) -> int:
    from agent.data.backup import TtyProgress, load_runtime, store_for, use_lean_aws_data
    from agent.data.restore import restore

    paths = _paths()
    use_lean_aws_data(paths)
    cfg, _ = load_runtime(paths)
    store = store_for(cfg)
    entries = [s for s in cfg.data if not args.name or s.name == args.name]
    if args.name and not entries:
        print(f"ec2-agent: no data entry named {args.name!r}", file=sys.stderr)
        return 1
    for spec in entries:
        bar = TtyProgress(f"restore {spec.name}")
        res = restore(store, cfg.group, spec.name, paths.rooted(spec.path),
                      snapshot_id=args.snapshot, force=args.force, progress=bar)
        bar.done()
        print(res.summary())
    return 0


# -- simulate -----------------------------------------------------------------------------------

def cmd_simulate(args: argparse.Namespace) -> int:
    if args.seed is not None:  # the deterministic fleet simulation (agent.sim.fleetsim)
        from agent.sim.simcli import run_cli

        return run_cli(args)
    from agent.sim.simulate import simulate

    return simulate(instances=args.instances, scenario=args.scenario, keep=args.keep,
                    as_json=args.json)


# -- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ec2-agent",
        description="Makes an EC2 instance ready to be replaced: configure from IMDS, user-data "
                    "and S3; heartbeat; replace dead peers safely.",
    )
    p.add_argument("--version", action="version", version=f"ec2-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("boot", help="run the boot phases once (from cloud-init or systemd)")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing; exit code only")
    s.set_defaults(func=cmd_boot)

    s = sub.add_parser("status", help="this instance's boot and membership state (local only)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--wait", action="store_true", help="wait until the boot is done or failed")
    s.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="with --wait: give up after S seconds (exit 1)")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("run", help="the daemon: heartbeat, watch peers, heal, refresh, backup")
    s.set_defaults(func=cmd_run)

    c = sub.add_parser("config", help="validate or show configuration")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    s = csub.add_parser("validate", help="validate a config layer file (agent.yaml or user-data)")
    s.add_argument("file")
    s.add_argument("--launch-index", type=int, default=None,
                   help="user-data: keep only the Launch-Index parts of this instance "
                        "(default: all parts)")
    s.set_defaults(func=cmd_config_validate)
    s = csub.add_parser("show", help="the merged config, secrets redacted")
    s.add_argument("--user-data", metavar="FILE",
                   help="read user-data from FILE instead of IMDS")
    s.set_defaults(func=cmd_config_show)

    s = sub.add_parser("peers", help="the group's members: id, zone, ip, state, age, health")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_peers)

    s = sub.add_parser("leave", help="leave the group on purpose (nobody replaces this instance)")
    s.add_argument("--reason", default="ec2-agent leave", help="recorded in the event")
    s.set_defaults(func=cmd_leave)

    s = sub.add_parser("events", help="the group's audit log of decisions, newest last")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("-n", "--limit", type=int, default=50, help="how many (default 50)")
    s.set_defaults(func=cmd_events)

    s = sub.add_parser("pause", help="kill switch: no peer in the group replaces anything")
    s.add_argument("--reason", default="", help="recorded in the event log")
    s.set_defaults(func=cmd_pause)

    s = sub.add_parser("resume", help="lift the kill switch (and reset failure streaks)")
    s.add_argument("--reason", default="", help="recorded in the event log")
    s.set_defaults(func=cmd_resume)

    b = sub.add_parser("bundle", help="publish config bundles")
    bsub = b.add_subparsers(dest="bundle_command", metavar="ACTION")
    bsub.required = True
    s = bsub.add_parser("push", help="publish DIR as the group's next bundle version")
    s.add_argument("dir", metavar="DIR")
    s.add_argument("--group", help="default: the local config's group")
    s.add_argument("--bucket", help="default: the local config's store.bucket")
    s.add_argument("--prefix", default=None, help="default: the local config's store.prefix")
    s.add_argument("--region", default=None, help="the bucket's region (default: from AWS config)")
    s.set_defaults(func=cmd_bundle_push)

    s = sub.add_parser("backup", help="snapshot every data entry to S3 now")
    s.add_argument("--final", action="store_true",
                   help="the shutdown backup: same, under a deadline, marked final")
    s.add_argument("--name", help="only the data entry NAME")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("restore", help="restore data entries from their latest snapshot")
    s.add_argument("--name", help="only the data entry NAME")
    s.add_argument("--snapshot", metavar="ID", help="this snapshot instead of the latest")
    s.add_argument("--force", action="store_true",
                   help="replace a non-empty data dir (it is moved aside, never deleted)")
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("simulate", help="run a fleet on the embedded emulated cloud; with "
                                        "--seed, the deterministic fleet simulation")
    s.add_argument("-n", "--instances", type=int, default=3)
    s.add_argument("--scenario", default=None,
                   help="kill-one | kill-half | api-outage | leave (rehearsals)")
    s.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
    s.add_argument("--json", action="store_true")
    g = s.add_argument_group("deterministic simulation (virtual time, in-memory twins)")
    g.add_argument("--seed", type=int, default=None,
                   help="run the deterministic fleet simulation with this seed")
    g.add_argument("--members", type=int, default=100)
    g.add_argument("--hours", type=float, default=1.0)
    g.add_argument("--faults", default="calm",
                   help="calm | flaky-store | partitions | zone-outage | control-plane-2007 | "
                        "stalls | stall-zone | part-zone | chaos | everything")
    g.add_argument("--report", default=None, metavar="FILE.html",
                   help="write a self-contained HTML timeline of the run")
    g.add_argument("--progress", action="store_true",
                   help="a line on stderr per simulated hour: deaths, replacements, "
                        "violations so far")
    s.set_defaults(func=cmd_simulate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AgentError as exc:
        print(f"ec2-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


# One-shot commands whose process ends right after: skipping the interpreter's teardown
# (garbage-collecting every loaded botocore model, ~0.1 s; ~40 ms after a restore) shortens
# the boot critical path and a restore. Everything they write is durable before main()
# returns (boot fsyncs its files; a restore's tree is synced before its swap, and the swap
# fsynced; a backup's manifest is in the store), their worker threads are joined, and they
# register no atexit work.
_FAST_EXIT = {"boot", "backup", "restore"}


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown, output flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry(argv: Sequence[str] | None = None) -> None:
    """The console script: ``main`` and then exit, fast where it is safe."""
    args = list(sys.argv[1:] if argv is None else argv)
    code = main(args)
    if args and args[0] in _FAST_EXIT:
        exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
