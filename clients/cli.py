"""The client commands of the llmgrpc CLI: talk to a server over gRPC.

llmgrpc specs [--model-name llama-3.1] [--model-format ggufv2] ...
llmgrpc launch --model-name tiny-llama-3.1 [--model-engine transformers] [--size-in-billions 8]
               [--model-format pytorch] [--quantization none] [--model-uid U] [--device cpu]
               [--download-hub auto]          (draws the download and load progress)
llmgrpc download --model-name llama-3.1 [--model-format ggufv2] [--quantization Q4_K_M] ...
llmgrpc models
llmgrpc get MODEL_UID
llmgrpc generate MODEL_UID "prompt" [--max-tokens 64] [--temperature 0] ...
llmgrpc terminate MODEL_UID

``llmgrpc serve`` and ``llmgrpc tiny-model`` live with the server (``llmgrpc.server.cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import uuid
from pathlib import Path
from typing import TextIO

import grpc
from google.protobuf.json_format import MessageToJson

from llmgrpc.clients.client import SAMPLING_KNOBS, SPEC_WORDS, Client
from llmgrpc.v1 import generate_pb2, models_pb2

DEFAULT_ENDPOINT = "127.0.0.1:50051"


def _print_message(message) -> None:
    print(MessageToJson(message, preserving_proto_field_name=True))


def _parse_option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def progress_line(progress, width: int = 24) -> str:
    """One line for a LoadProgress: the phase, and a bar of bytes when they are known."""
    if progress.total_bytes <= 0:
        return progress.phase
    fraction = min(progress.done_bytes / progress.total_bytes, 1.0)
    bar = "#" * round(fraction * width)
    return (
        f"{progress.phase} [{bar:<{width}}] {fraction:4.0%} "
        f"{_size(progress.done_bytes)} / {_size(progress.total_bytes)}"
    )


class ProgressLine:
    """Draws progress on a stream: redrawn in place on a terminal, a line per phase otherwise."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.redraw = stream.isatty()
        self._last_phase = ""
        self._width = 0

    def show(self, progress) -> None:
        line = progress_line(progress)
        if self.redraw:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        elif progress.phase != self._last_phase:
            self.stream.write(line + "\n")
        self._last_phase = progress.phase
        self.stream.flush()

    def close(self) -> None:
        if self.redraw and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def _client_uid(model_name: str) -> str:
    """A uid for a launch that names none, made here so that its progress can be asked for."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", model_name)[:48].lstrip("._-") or "model"
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def _gpu_indices(text: str) -> list[int]:
    """A --gpu-idx value: GPU indices, comma-separated."""
    try:
        return [int(index) for index in text.split(",") if index.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not GPU indices (whole numbers, e.g. 0,1)") from None


def launch_with_progress(client: Client, stream: TextIO, **launch) -> models_pb2.ModelDescription:
    """client.launch(**launch), drawing the model's progress from WatchModel while the call waits.

    The launch call itself waits (so leaving the command, Ctrl-C, stops the launch); the watch
    starts as soon as the server lists the uid, which it does the moment the launch arrives.
    """
    uid = launch.pop("model_uid", "") or _client_uid(launch.get("model_name", ""))
    line = ProgressLine(stream)
    outcome: dict[str, object] = {}

    def run_launch() -> None:
        try:
            outcome["model"] = client.launch(model_uid=uid, **launch)
        except grpc.RpcError as error:
            outcome["error"] = error

    launching = threading.Thread(target=run_launch, name="launch", daemon=True)
    launching.start()
    try:
        while launching.is_alive():
            try:
                for model in client.watch(uid):
                    if model.HasField("progress"):
                        line.show(model.progress)
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: not listed yet, or gone
                    break
                launching.join(0.05)
        launching.join()
    finally:
        line.close()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["model"]  # type: ignore[return-value]


def add_client_commands(commands) -> None:
    """The subcommands that call a server: specs, launch, download, models, get, terminate, generate."""

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--endpoint", default=DEFAULT_ENDPOINT, help=f"server address (default {DEFAULT_ENDPOINT})"
        )
        command.add_argument(
            "--token",
            default=os.environ.get("LLMGRPC_TOKEN"),
            help="bearer token (default: env LLMGRPC_TOKEN)",
        )
        command.add_argument(
            "--cacert", type=Path, help="TLS: the CA that signed the server's certificate (PEM)"
        )
        command.add_argument("--cert", type=Path, help="mutual TLS: this client's certificate (PEM)")
        command.add_argument("--key", type=Path, help="mutual TLS: this client's private key (PEM)")
        return command

    specs = client_command("specs", "list model families and specs")
    launch = client_command("launch", "launch a model (flags as xinference launch)")
    download = client_command("download", "download a spec's weights into the hub's cache, without launching")
    for command in (specs, launch, download):
        for flag in (
            "--model-name",
            "--model-engine",
            "--model-format",
            "--size-in-billions",
            "--quantization",
        ):
            command.add_argument(flag, default="")
    for command in (launch, download):
        command.add_argument(
            "--download-hub",
            default="",
            help="huggingface, modelscope or auto (default: the spec's hubs in order)",
        )
    launch.add_argument("--model-uid", default="")
    launch.add_argument("--model-path", default="", help="local weights instead of a hub download")
    launch.add_argument("--device", default="", help="auto, cpu, cuda or cuda:N")
    launch.add_argument("--n-gpu", default="", help="GPUs to spread the model over: a count, or auto")
    launch.add_argument(
        "--gpu-idx",
        action="append",
        default=[],
        type=_gpu_indices,
        help="GPUs to use, by index (repeat the flag, or a comma list: 0,1); with --replica, every "
        "replica's GPUs, replica after replica",
    )
    launch.add_argument(
        "--replica",
        type=int,
        default=None,
        help="worker processes serving the model, each a whole copy on its own device(s) (default 1)",
    )
    launch.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters to serve with the model (a local PEFT folder or a hub id each)",
    )
    launch.add_argument("--max-loras", type=int, default=None, help="adapters resident at once (default 4)")
    launch.add_argument("--max-lora-rank", type=int, default=None, help="highest adapter rank (default 16)")
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
    chat = client_command(
        "chat", "talk with a chat model: each line you type is a turn (the history is kept)"
    )
    chat.add_argument("model_uid")
    chat.add_argument("--system", default="", help="a system message that starts the conversation")
    chat.add_argument(
        "--message",
        action="append",
        default=[],
        help="one-shot: send these user turns in order, print the answers, exit",
    )
    for name, kind in SAMPLING_FLAGS.items():
        for command in (generate, chat):
            command.add_argument("--" + name.replace("_", "-"), type=kind)
    for command in (generate, chat):
        command.add_argument("--adapter", default="", help="a LoRA adapter of the model, by name")
        command.add_argument("--stop", action="append", default=[])
        command.add_argument("--ignore-eos", action="store_true")


def _lora_module(words: str) -> models_pb2.LoraModule:
    """xinference's NAME=PATH."""
    name, _, path = words.partition("=")
    return models_pb2.LoraModule(name=name, path=path)


def run_client_command(args: argparse.Namespace) -> None:
    """Run one client command; a failed call exits with its status code and message."""
    try:
        _run(args)
    except grpc.RpcError as error:
        raise SystemExit(f"{error.code().name}: {error.details()}") from None


def _spec_words(args: argparse.Namespace) -> dict[str, str]:
    """The flags that choose a spec (Client's SPEC_WORDS), as keyword arguments."""
    return {word: getattr(args, word) for word in SPEC_WORDS}


def _run(args: argparse.Namespace) -> None:
    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path else None

    with Client(
        args.endpoint,
        token=args.token,
        root_certificates=read(args.cacert),
        private_key=read(args.key),
        certificate_chain=read(args.cert),
    ) as client:
        if args.command == "specs":
            families = client.list_specs(model_name=args.model_name, **_spec_words(args))
            _print_message(models_pb2.ListSpecsResponse(families=families))
        elif args.command == "launch":
            model = launch_with_progress(
                client,
                sys.stderr,
                model_name=args.model_name,
                **_spec_words(args),
                model_uid=args.model_uid,
                model_path=args.model_path,
                device=args.device,
                engine_options=dict(_parse_option(option) for option in args.engine_option),
                download_hub=args.download_hub,
                n_gpu=args.n_gpu,
                gpu_idx=[index for indices in args.gpu_idx for index in indices],
                replica=args.replica,
                lora_modules=[_lora_module(words) for words in args.lora_modules],
                max_loras=args.max_loras,
                max_lora_rank=args.max_lora_rank,
            )
            _print_message(model)
        elif args.command == "download":
            line = ProgressLine(sys.stderr)
            try:
                for message in client.download(
                    args.model_name, download_hub=args.download_hub, **_spec_words(args)
                ):
                    if message.model_path:
                        line.close()
                        print(message.model_path)
                    else:
                        line.show(message.progress)
            finally:
                line.close()
        elif args.command == "models":
            for model in client.list_models():
                _print_message(model)
        elif args.command == "get":
            _print_message(client.get_model(args.model_uid))
        elif args.command == "terminate":
            _print_message(client.terminate(args.model_uid))
        elif args.command == "generate":
            stream = client.generate(args.model_uid, args.prompt, **_sampling(args))
            last, _ = _print_stream(stream)
            print(flush=True)
            _print_ending(last)
        elif args.command == "chat":
            chat_session(client, args)


# The knobs a flag sets: all but logprobs, since the commands print text alone.
SAMPLING_FLAGS = {name: kind for name, kind in SAMPLING_KNOBS.items() if name != "logprobs"}


def _sampling(args: argparse.Namespace) -> dict:
    """The GenerateRequest sampling fields the command's flags set."""
    given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    return {**given, "stop": args.stop, "ignore_eos": args.ignore_eos, "adapter": args.adapter}


def _print_stream(stream) -> tuple[generate_pb2.GenerateResponse | None, str]:
    """Write a Generate stream's text to stdout as it comes; its last message and whole text."""
    last, pieces = None, []
    for last in stream:
        pieces.append(last.text)
        sys.stdout.write(last.text)
        sys.stdout.flush()
    return last, "".join(pieces)


def chat_session(client: Client, args: argparse.Namespace, lines: TextIO | None = None) -> None:
    """A conversation with args.model_uid: each user turn (a --message, or a line read from
    lines/stdin until it ends) is sent with the whole history, and the answer streams back."""
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    turns = iter(args.message) if args.message else _read_turns(lines or sys.stdin)
    for turn in turns:
        history.append({"role": "user", "content": turn})
        last, text = _print_stream(client.chat(args.model_uid, history, **_sampling(args)))
        print(flush=True)
        _print_ending(last)
        history.append({"role": "assistant", "content": text})


def _print_ending(last: generate_pb2.GenerateResponse | None) -> None:
    """Why an answer ended and its token counts (and tool calls), on stderr."""
    if last is None:
        return
    reason = generate_pb2.FinishReason.Name(last.finish_reason)
    calls = "".join(f"; called {call.name}({call.arguments})" for call in last.tool_calls)
    print(
        f"[{reason}; {last.usage.prompt_tokens} prompt + "
        f"{last.usage.completion_tokens} generated tokens{calls}]",
        file=sys.stderr,
        flush=True,
    )


def _read_turns(lines: TextIO):
    while True:
        if lines.isatty():
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = lines.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")
