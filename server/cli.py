"""The llmgrpc command: run the server, or talk to one over gRPC.

llmgrpc serve [--host H] [--port P] [--launch tiny-llama-3.1] ...   (every setting is a flag)
llmgrpc tiny-model OUTPUT_DIR
llmgrpc doctor                                (can this host run the engines installed here?)
llmgrpc specs | launch | download | models | get | generate | terminate ...
                                              (the client commands: llmgrpc.clients.cli)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import typing
from pathlib import Path

from pydantic import ValidationError

from llmgrpc.clients.cli import add_client_commands, run_client_command
from llmgrpc.server.settings import Settings


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, with its description as help; unset flags leave env and defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        origin = typing.get_origin(field.annotation)
        help_text = f"{field.description} (env LLMGRPC_{name.upper()})"
        if origin is list:
            parser.add_argument(flag, dest=name, action="append", help=help_text)
        elif origin is dict:
            parser.add_argument(flag, dest=name, type=json.loads, help=help_text)
        else:
            parser.add_argument(flag, dest=name, help=help_text)


def _settings_from(args: argparse.Namespace) -> Settings:
    given = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    try:
        return Settings(**given)
    except ValidationError as error:
        raise SystemExit(f"invalid settings:\n{error}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmgrpc", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    _add_settings_flags(serve)

    add_client_commands(commands)

    tiny = commands.add_parser("tiny-model", help="write the tiny Llama 3.1 model to a folder")
    tiny.add_argument("output_dir", type=Path)

    doctor = commands.add_parser(
        "doctor", help="check this host against the engines' builds (CPU features, GPUs, caches)"
    )
    _add_settings_flags(doctor)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        settings = _settings_from(args)
        from llmgrpc.server import logs
        from llmgrpc.server.app import serve

        logs.configure(settings.log_level, settings.log_format)

        asyncio.run(serve(settings))
    elif args.command == "tiny-model":
        from llmgrpc.engines.weights import tiny_model

        print(tiny_model.generate(args.output_dir))
    elif args.command == "doctor":
        from llmgrpc.server import doctor

        raise SystemExit(doctor.run(_settings_from(args)))
    else:
        run_client_command(args)


if __name__ == "__main__":
    main()
