"""``tether-agent``: ``run`` (the systemd service) and ``selfcheck``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from . import instancekeys, machine, selfcheck, tlsctx
from .dialer import DialOptions, open_socket
from .journal import setup as setup_logging
from .probes import probe_home
from .settings import DEFAULT_ETC, DEFAULT_FIRSTBOOT, DEFAULT_STATE, SettingsError, load


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--etc", type=Path, default=DEFAULT_ETC,
                        help="image credential directory (default /etc/tether)")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE,
                        help="state directory (default /var/lib/tether)")
    parser.add_argument("--firstboot", type=Path, default=DEFAULT_FIRSTBOOT,
                        help="first-boot settings overriding agent.json "
                             "(default /run/tether/firstboot.json)")
    parser.add_argument("--dmi-dir", type=Path, default=machine.DMI_DIR,
                        help=argparse.SUPPRESS)  # tests: a fake /sys/class/dmi/id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether-agent",
                                     description="tether appliance agent")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent (what the systemd unit starts)")
    _common(run)
    run.add_argument("--sockets", type=int, help="parallel sockets to home (default 2)")
    run.add_argument("--socket-ttl", type=float, help="seconds a socket lives before "
                     "it is replaced (default 3600)")
    run.add_argument("--selfcheck-interval", type=float, default=300.0)
    run.add_argument("--drain-quiet", type=float, default=2.0, help=argparse.SUPPRESS)
    run.add_argument("--renew-min-interval", type=float, default=60.0, help=argparse.SUPPRESS)
    # tests: their own rauc command, kernel command line and image version file
    run.add_argument("--rauc", default="rauc", help=argparse.SUPPRESS)
    run.add_argument("--cmdline", type=Path, default=Path("/proc/cmdline"), help=argparse.SUPPRESS)
    run.add_argument("--image-version-file", type=Path, default=Path("/usr/local/lib/tether/image-version"),
                     help=argparse.SUPPRESS)
    run.add_argument("--log-level", default="INFO")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("selfcheck", help="check resources and the way to home")
    _common(check)
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--offline", action="store_true", help="do not contact home")
    check.set_defaults(func=cmd_selfcheck)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import Agent, RunOptions

    sink = setup_logging(getattr(logging, str(args.log_level).upper(), logging.INFO))
    logging.getLogger("tether.agent").info("tether-agent starting (logs to %s)", sink)
    settings = load(args.etc, args.state, args.firstboot)
    options = RunOptions(dmi_dir=args.dmi_dir, sockets=args.sockets, ttl_s=args.socket_ttl,
                         selfcheck_interval_s=args.selfcheck_interval,
                         drain_quiet_s=args.drain_quiet,
                         renew_min_interval_s=args.renew_min_interval, rauc=args.rauc,
                         cmdline=args.cmdline, image_version_file=args.image_version_file)
    return asyncio.run(Agent(settings, options).run())


async def _probe(settings) -> selfcheck.HomeProbe:
    """Reach the first home URL with the best certificate we have."""
    cert, key = instancekeys.cert_path(settings.state_dir), instancekeys.key_path(settings.state_dir)
    if not (cert.exists() and key.exists()):
        cert, key = settings.image_cert, settings.image_key
    options = DialOptions(ssl_context=lambda: tlsctx.client_context(settings.ca_cert, cert, key),
                          proxy=lambda: settings.proxy, user_agent="tether-agent selfcheck")

    async def connect():
        ws = await open_socket(settings.home_urls[0], options)
        try:
            return ws.response.headers
        finally:
            await ws.close()
    return await probe_home(settings.home_urls[0], connect, via_proxy=settings.proxy is not None)


def cmd_selfcheck(args: argparse.Namespace) -> int:
    home = selfcheck.HomeProbe()
    if not args.offline:
        try:
            settings = load(args.etc, args.state, args.firstboot)
            home = asyncio.run(_probe(settings))
        except (SettingsError, OSError) as exc:
            print(f"tether-agent selfcheck: cannot check home: {exc}", file=sys.stderr)
    report = selfcheck.evaluate(selfcheck.measure_host(args.state, args.dmi_dir, home))
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print(selfcheck.format_text(report))
    return 0 if report.verdict == selfcheck.OK else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as exc:
        print(f"tether-agent: {exc}", file=sys.stderr)
        return 2
    except instancekeys.InstanceKeyError as exc:
        print(f"tether-agent: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
