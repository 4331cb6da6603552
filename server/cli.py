"""The llmgrpc command: run the server, or talk to one over gRPC.

llmgrpc serve [--host H] [--port P] [--launch tiny-llama-3.1] ...   (every setting is a flag)
llmgrpc specs [--model-name llama-3.1] [--model-format ggufv2] ...
llmgrpc launch --model-name tiny-llama-3.1 [--model-engine transformers] [--size-in-billions 8]
               [--model-format pytorch] [--quantization none] [--model-uid U] [--device cpu]
llmgrpc models
llmgrpc generate MODEL_UID "prompt" [--max-tokens 64] [--temperature 0] ...
llmgrpc terminate MODEL_UID
llmgrpc tiny-model OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import typing
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToJson
from pydantic import ValidationError

from llmgrpc.server.settings import Settings

DEFAULT_ENDPOINT = "127.0.0.1:50051"


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


def _print_message(message) -> None:
    print(MessageToJson(message, preserving_proto_field_name=True))


def _parse_option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmgrpc", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    _add_settings_flags(serve)

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--endpoint", default=DEFAULT_ENDPOINT, help=f"server address (default {DEFAULT_ENDPOINT})"
        )
        return command

    specs = client_command("specs", "list model families and specs")
    launch = client_command("launch", "launch a model (flags as xinference launch)")
    for command in (specs, launch):
        for flag in (
            "--model-name",
            "--model-engine",
            "--model-format",
            "--size-in-billions",
            "--quantization",
        ):
            command.add_argument(flag, default="")
    launch.add_argument("--model-uid", default="")
    launch.add_argument("--model-path", default="", help="local weights instead of a hub download")
    launch.add_argument("--device", default="", help="auto, cpu, cuda or cuda:N")
    launch.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine option (value as JSON)",
    )
    client_command("models", "list launched models")
    get = client_command("get", "describe one launched model")
    get.add_argument("model_uid")
    terminate = client_command("terminate", "terminate a launched model")
    terminate.add_argument("model_uid")

    generate = client_command("generate", "stream a completion to stdout")
    generate.add_argument("model_uid")
    generate.add_argument("prompt")
    for flag, kind in (
        ("--max-tokens", int),
        ("--temperature", float),
        ("--top-p", float),
        ("--top-k", int),
        ("--min-p", float),
        ("--repetition-penalty", float),
        ("--presence-penalty", float),
        ("--frequency-penalty", float),
        ("--seed", int),
        ("--min-tokens", int),
    ):
        generate.add_argument(flag, type=kind)
    generate.add_argument("--stop", action="append", default=[])
    generate.add_argument("--ignore-eos", action="store_true")

    tiny = commands.add_parser("tiny-model", help="write the tiny Llama 3.1 model to a folder")
    tiny.add_argument("output_dir", type=Path)
    return parser


def run_client_command(args: argparse.Namespace) -> None:
    from llmgrpc.clients import Client

    with Client(args.endpoint) as client:
        if args.command == "specs":
            filters = {
                k: getattr(args, k)
                for k in ("model_name", "model_engine", "model_format", "size_in_billions", "quantization")
            }
            from llmgrpc.v1 import models_pb2

            _print_message(models_pb2.ListSpecsResponse(families=client.list_specs(**filters)))
        elif args.command == "launch":
            model = client.launch(
                args.model_name,
                model_engine=args.model_engine,
                model_format=args.model_format,
                size_in_billions=args.size_in_billions,
                quantization=args.quantization,
                model_uid=args.model_uid,
                model_path=args.model_path,
                device=args.device,
                engine_options=dict(_parse_option(option) for option in args.engine_option),
            )
            _print_message(model)
        elif args.command == "models":
            for model in client.list_models():
                _print_message(model)
        elif args.command == "get":
            _print_message(client.get_model(args.model_uid))
        elif args.command == "terminate":
            _print_message(client.terminate(args.model_uid))
        elif args.command == "generate":
            names = (
                "max_tokens",
                "temperature",
                "top_p",
                "top_k",
                "min_p",
                "repetition_penalty",
                "presence_penalty",
                "frequency_penalty",
                "seed",
                "min_tokens",
            )
            sampling = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
            last = None
            for last in client.generate(
                args.model_uid, args.prompt, stop=args.stop, ignore_eos=args.ignore_eos, **sampling
            ):
                sys.stdout.write(last.text)
                sys.stdout.flush()
            if last is not None:
                from llmgrpc.v1 import generate_pb2

                reason = generate_pb2.FinishReason.Name(last.finish_reason)
                print(
                    f"\n[{reason}; {last.usage.prompt_tokens} prompt + "
                    f"{last.usage.completion_tokens} generated tokens]",
                    file=sys.stderr,
                )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        settings = _settings_from(args)
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
        from llmgrpc.server.app import serve

        asyncio.run(serve(settings))
    elif args.command == "tiny-model":
        from llmgrpc.engines import tiny_model

        print(tiny_model.generate(args.output_dir))
    else:
        try:
            run_client_command(args)
        except grpc.RpcError as error:
            raise SystemExit(f"{error.code().name}: {error.details()}") from None


if __name__ == "__main__":
    main()
