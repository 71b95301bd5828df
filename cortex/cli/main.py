"""`cortex`: the gateway's command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cortex.cli import bench as bench_cli
from cortex.cli import cancel as cancel_cli
from cortex.cli import init as init_cli
from cortex.cli import join as join_cli
from cortex.cli import linktest as linktest_cli
from cortex.cli import load as load_cli
from cortex.cli import ops as ops_cli
from cortex.cli import reboot as reboot_cli
from cortex.cli import restart as restart_cli
from cortex.cli import trace as trace_cli
from cortex.cli.remote import CONNECTION_HELP
from cortex.config import CortexConfig, catalogue_problems
from shared.catalogue import Catalogue
from shared.config import ConfigError
from shared.versions import version_text

DESCRIPTION = """\
cortex: an OpenAI-compatible gateway in front of a fleet of neurons.

It polls every neuron, loads catalogued models on demand, routes each request
to the least-loaded ready replica (with prompt-cache affinity) and answers
every failure with the OpenAI error envelope and, when retrying may help, a
Retry-After header.
"""

EPILOG = f"""\
Commands that talk to a running cortex (status, models, preview, load, unload,
doctor, trace, events, cancel, bench, linktest, restart, reboot, join-code) all
find it one way:
{CONNECTION_HELP}

examples:
  cortex serve -c cortex.toml           run the gateway
  cortex check -c cortex.toml           validate the config and the catalogue
  cortex fleet --dir run                start a local demo fleet (cortex + neurons)
  cortex load demo                      place a model on a running cortex, follow it to ready
  cortex status                         the fleet at a glance (models, preview, unload too)
  cortex doctor                         the morning checklist, pass / warn / fail
  cortex join-code                      a one-time code: `neuron join` adds a node with it

a minimal cortex.toml:
  port = 9400
  catalogue = "models.toml"     # relative to this file
  fleet_token_file = "/etc/cortex-neuron/fleet-token"   # the neurons' token too
  [[neurons]]
  name = "studio-1"
  url = "http://10.0.0.11:9410"
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cortex",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=version_text("cortex"))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway until SIGINT/SIGTERM.",
    )
    serve.add_argument("-c", "--config", required=True, help="path to cortex.toml")
    serve.add_argument("--host", help="listen address (overrides the config)")
    serve.add_argument("--port", type=int, help="listen port (overrides the config)")
    serve.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default: INFO)",
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser(
        "check",
        help="validate cortex.toml and its catalogue, then exit",
        description="Load cortex.toml and the catalogue strictly; print a summary.",
    )
    check.add_argument("-c", "--config", required=True, help="path to cortex.toml")
    check.set_defaults(func=_check)

    load_cli.add_parser(sub)
    ops_cli.add_parsers(sub)
    init_cli.add_parser(sub)
    linktest_cli.add_parser(sub)
    restart_cli.add_parser(sub)
    join_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    trace_cli.add_trace_parser(sub)
    trace_cli.add_events_parser(sub)
    cancel_cli.add_parser(sub)
    reboot_cli.add_parser(sub)

    fleet = sub.add_parser(
        "fleet",
        help="start a local fleet (cortex plus neurons serving demo and smollm2-135m)",
        description="Start a local fleet; every argument after 'fleet' is passed on.",
        add_help=False,
    )
    fleet.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the fleet command")
    fleet.set_defaults(func=lambda a: _fleet(a.args))
    return p


def _load(path: str) -> tuple[CortexConfig, Catalogue]:
    config = CortexConfig.from_file(path)
    return config, Catalogue.load(config.catalogue)


def _serve(args: argparse.Namespace) -> int:
    from cortex.http import reload
    from cortex.http.app import create_app
    from cortex.http.proxy import request_id
    from shared import logjson
    from shared.serve import ConnectionLimits, run_app

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config, catalogue = _load(args.config)
    logjson.configure(config.log_format, service="cortex")
    host = args.host or config.host
    port = config.port if args.port is None else args.port
    app = create_app(config, catalogue=catalogue)
    reload.setup(app, args.config)  # SIGHUP (and watch_config) re-read the files
    logjson.install(app, config.log_format, request_id)  # the request id on its lines
    say = logjson.printer(config.log_format, "cortex")  # json: stdout has JSON lines only
    say(f"cortex listening on http://{host}:{port} ({len(config.neurons)} neuron(s))")
    # handler_cancellation: a client that disconnects cancels its upstream request.
    try:
        run_app(
            app,
            access_log=config.access_log,
            limits=ConnectionLimits.of(config),
            host=host,
            port=port,
            print=None,
            handler_cancellation=True,
            # The drain (on_shutdown) bounds the wait; this only backs it up.
            shutdown_timeout=config.drain_s + 10,
        )
    except OSError as exc:
        print(f"cortex: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    return 0


def _check(args: argparse.Namespace) -> int:
    config, catalogue = _load(args.config)
    print(f"config ok: {args.config}")
    print(f"  listen     {config.host}:{config.port}")
    print(f"  catalogue  {config.catalogue} ({len(catalogue.models)} models)")
    for n in config.neurons:
        print(f"  neuron     {n.name} {n.url}")
    if config.discover:
        print("  discover   on: also neurons announced over mDNS that prove the fleet token")
    auth = f"on, {len(config.api_keys)} key(s)" if config.api_keys else "off"
    print(f"  auth       {auth}")
    print(f"  fleet      {_token_source(config)}")
    problems = catalogue_problems(config, catalogue)
    for p in problems:
        print(f"  problem    {p}", file=sys.stderr)
    return 1 if problems else 0


def _token_source(config: CortexConfig) -> str:
    """Where the fleet token came from; never the token."""
    if config.fleet_token is None:
        return "no fleet token: neurons must run without one (their API is open)"
    env = config.fleet_token_env
    where = f"environment variable {env}" if env and os.environ.get(env) else "file"
    if where == "file":
        where = f"file {config.fleet_token_file}"
    return f"token set (from {where}), sent to every neuron"


def _fleet(argv: Sequence[str]) -> int:
    from cortex.cli.local_fleet import main as fleet_main  # type: ignore[import-not-found,unused-ignore]

    rc: int = fleet_main(list(argv))
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fleet"]:
        # Everything after `fleet` is its own (argparse would eat leading options).
        return _fleet(argv[1:])
    args = _parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except ConfigError as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
