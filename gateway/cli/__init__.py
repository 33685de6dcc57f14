"""The `neogate` command: the composition root, the only part of `gateway` that may import `loadtest`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from gateway.config import ConfigError, load_config

log = logging.getLogger("neogate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neogate",
        description="An OpenAI-compatible inference gateway that routes by price, latency "
        "and a batch-aware GPU cost model, and meters every token.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway (the embedded default without --config)")
    serve.add_argument("--config", help="policy YAML; without it, the embedded default")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--workers", type=int, default=1, help="gateway processes sharing the port")
    serve.set_defaults(func=_run_serve)

    check = sub.add_parser(
        "check-config",
        help="validate a policy YAML",
        description="Validate a policy file exactly as `neogate serve --config` does: the "
        "schema, cross-references (backends a model lists, models a tenant may use, "
        "duplicate names) and env: secrets whose variable is unset. Every error is "
        "printed at once with the file, line and field path. Exit 0 when the file is "
        "good, 2 when it is not (the same status serve exits with).",
    )
    check.add_argument(
        "path", metavar="PATH", help="the policy YAML file, e.g. policies/examples/default.yaml"
    )
    check.set_defaults(func=_run_check)

    for hook in _plugin_parsers():
        hook(sub)
    return parser


def _plugin_parsers() -> list[
    Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]
]:
    """Subcommands whose code lives beside the parts they drive."""
    from gateway.cli.tools import add_tool_parsers

    return [add_tool_parsers]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO; a command's own output says what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result: int = args.func(args)
    return result


def _run_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path, require_env=True)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    simulated = [b.name for b in config.backends if b.simulated]
    note = f"; simulated by neogate serve: {', '.join(simulated)}" if simulated else ""
    print(
        f"{args.path}: ok ({len(config.backends)} backends, {len(config.models)} models, "
        f"{len(config.tenants)} tenants{note})"
    )
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from gateway.cli.launch import ServeOptions
    from gateway.cli.serve import serve_forever

    opts = ServeOptions(
        config_path=args.config, host=args.host, port=args.port, workers=args.workers
    )
    try:
        return serve_forever(opts)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
