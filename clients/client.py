"""A thin, typed Python client over the generated stubs."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor

from llmgrpc.v1 import generate_pb2, generate_pb2_grpc, models_pb2, models_pb2_grpc

_NUMBER_TYPES = {
    FieldDescriptor.TYPE_FLOAT: float,
    FieldDescriptor.TYPE_DOUBLE: float,
    FieldDescriptor.TYPE_INT32: int,
    FieldDescriptor.TYPE_INT64: int,
    FieldDescriptor.TYPE_UINT32: int,
    FieldDescriptor.TYPE_UINT64: int,
}
# GenerateRequest's optional numbers, each with its Python type: the sampling knobs a caller may
# set, unset meaning the model's default. The CLI's flags and the other protocols' sampling
# fields are read from here, so a knob added to the proto is offered everywhere.
SAMPLING_KNOBS: dict[str, type] = {
    field.name: _NUMBER_TYPES[field.type]
    for field in generate_pb2.GenerateRequest.DESCRIPTOR.fields
    if field.has_presence and field.type in _NUMBER_TYPES
}
# The words that choose one spec of a family, beside model_name: ListSpecs filters by them,
# LaunchModel and DownloadModel take them (empty: whichever the server picks).
SPEC_WORDS = ("model_engine", "model_format", "size_in_billions", "quantization")


class Client:
    """Calls one llmgrpc server. Use as a context manager, or call close().

    >>> with Client("127.0.0.1:50051") as client:
    ...     model = client.launch("tiny-llama-3.1")
    ...     for piece in client.generate(model.model_uid, "Hello", max_tokens=16):
    ...         print(piece.text, end="")
    """

    def __init__(
        self,
        endpoint: str,
        channel: grpc.Channel | None = None,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
    ):
        """token: sent as 'authorization: Bearer <token>' on every call (needs TLS unless the
        endpoint is local). root_certificates: TLS, trusting this CA (PEM); private_key and
        certificate_chain: this client's certificate, for servers that require mutual TLS."""
        if channel is None:
            channel = self._channel(endpoint, token, root_certificates, private_key, certificate_chain)
        self.channel = channel
        self.models = models_pb2_grpc.ModelServiceStub(self.channel)
        self.generation = generate_pb2_grpc.GenerateServiceStub(self.channel)

    @staticmethod
    def _channel(endpoint, token, root_certificates, private_key, certificate_chain) -> grpc.Channel:
        tls = root_certificates is not None or certificate_chain is not None
        if not tls and token is None:
            return grpc.insecure_channel(endpoint)
        if tls:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        else:
            # Tokens in plaintext only to a local endpoint (gRPC refuses them elsewhere).
            credentials = grpc.local_channel_credentials()
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
        return grpc.secure_channel(endpoint, credentials)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def list_specs(self, *, timeout: float | None = None, **filters: str) -> list[models_pb2.ModelFamily]:
        """Families of the registry, filtered by any of: model_name and SPEC_WORDS."""
        return list(self.models.ListSpecs(models_pb2.ListSpecsRequest(**filters), timeout=timeout).families)

    def launch(
        self,
        model_name: str,
        *,
        model_engine: str = "",
        model_format: str = "",
        size_in_billions: str = "",
        quantization: str = "",
        model_uid: str = "",
        model_path: str = "",
        device: str = "",
        engine_options: Mapping[str, Any] | None = None,
        download_hub: str = "",
        wait: bool = True,
        idle_unload_s: float | None = None,
        n_gpu: str | int = "",
        gpu_idx: Sequence[int] = (),
        replica: int | None = None,
        lora_modules: Sequence[models_pb2.LoraModule] = (),
        max_loras: int | None = None,
        max_lora_rank: int | None = None,
        timeout: float | None = None,
    ) -> models_pb2.ModelDescription:
        """Launch a model and wait until it is READY (watch() shows its progress meanwhile); with
        wait=False, return its LOADING description at once. idle_unload_s: unload it after that
        many seconds without requests (None: the server's default; 0: never). n_gpu: a count or
        "auto"; gpu_idx: the GPUs to use, by index (every replica's, replica after replica).
        replica: worker processes serving the uid (None: the server's default, 1). lora_modules:
        LoRA adapters served with it (requests name one in `adapter`); max_loras, max_lora_rank:
        their limits (None: the server's defaults)."""
        request = models_pb2.LaunchModelRequest(
            model_name=model_name,
            model_engine=model_engine,
            model_format=model_format,
            size_in_billions=size_in_billions,
            quantization=quantization,
            model_uid=model_uid,
            model_path=model_path,
            device=device,
            download_hub=download_hub,
            wait=wait,
            n_gpu=str(n_gpu),
            gpu_idx=list(gpu_idx),
            lora_modules=list(lora_modules),
        )
        for name, value in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank)):
            if value is not None:
                setattr(request, name, value)
        if idle_unload_s is not None:
            request.idle_unload_s = idle_unload_s
        if replica is not None:
            request.replica = replica
        if engine_options:
            options = struct_pb2.Struct()
            options.update(dict(engine_options))
            request.engine_options.CopyFrom(options)
        return self.models.LaunchModel(request, timeout=timeout).model

    def load_adapter(
        self,
        model_uid: str,
        name: str,
        path: str,
        *,
        scale: float | None = None,
        timeout: float | None = None,
    ) -> models_pb2.AdapterDescription:
        """Add a LoRA adapter to a READY model (admin role); path: a local PEFT folder or a hub id."""
        adapter = models_pb2.LoraModule(name=name, path=path)
        if scale is not None:
            adapter.scale = scale
        request = models_pb2.LoadAdapterRequest(model_uid=model_uid, adapter=adapter)
        return self.models.LoadAdapter(request, timeout=timeout).adapter

    def unload_adapter(
        self, model_uid: str, name: str, timeout: float | None = None
    ) -> models_pb2.AdapterDescription:
        """Remove an adapter; refused (FAILED_PRECONDITION) while streams of it are in flight."""
        request = models_pb2.UnloadAdapterRequest(model_uid=model_uid, name=name)
        return self.models.UnloadAdapter(request, timeout=timeout).adapter

    def list_adapters(
        self, model_uid: str, timeout: float | None = None
    ) -> list[models_pb2.AdapterDescription]:
        request = models_pb2.ListAdaptersRequest(model_uid=model_uid)
        return list(self.models.ListAdapters(request, timeout=timeout).adapters)

    def download(
        self, model_name: str, *, download_hub: str = "", timeout: float | None = None, **spec: str
    ) -> Iterator[models_pb2.DownloadModelResponse]:
        """Download a spec's weights without launching it: progress messages, then one with
        model_path. spec: any of SPEC_WORDS, as launch() takes them. Stop iterating (or .cancel()
        the iterator) to stop the download."""
        request = models_pb2.DownloadModelRequest(model_name=model_name, download_hub=download_hub, **spec)
        return self.models.DownloadModel(request, timeout=timeout)

    def watch(self, model_uid: str, *, timeout: float | None = None) -> Iterator[models_pb2.ModelDescription]:
        """The model as it is, then after each change of state or load progress, until it settles
        (READY, FAILED, UNLOADED or TERMINATED)."""
        request = models_pb2.WatchModelRequest(model_uid=model_uid)
        for event in self.models.WatchModel(request, timeout=timeout):
            yield event.model

    def list_models(self, *, timeout: float | None = None) -> list[models_pb2.ModelDescription]:
        return list(self.models.ListModels(models_pb2.ListModelsRequest(), timeout=timeout).models)

    def get_model(self, model_uid: str, *, timeout: float | None = None) -> models_pb2.ModelDescription:
        return self.models.GetModel(models_pb2.GetModelRequest(model_uid=model_uid), timeout=timeout).model

    def terminate(self, model_uid: str, *, timeout: float | None = None) -> models_pb2.ModelDescription:
        request = models_pb2.TerminateModelRequest(model_uid=model_uid)
        return self.models.TerminateModel(request, timeout=timeout).model

    def tokenize(
        self, model_uid: str, text: str, *, parse_special_tokens: bool = False, timeout: float | None = None
    ) -> generate_pb2.TokenizeResponse:
        """text's token ids (and each token's text), as Generate tokenizes a prompt: special-token
        spellings in text are text unless parse_special_tokens."""
        request = generate_pb2.TokenizeRequest(
            model_uid=model_uid, text=text, parse_special_tokens=parse_special_tokens
        )
        return self.generation.Tokenize(request, timeout=timeout)

    def detokenize(self, model_uid: str, token_ids: list[int], *, timeout: float | None = None) -> str:
        """The text of token_ids, special tokens left out."""
        request = generate_pb2.DetokenizeRequest(model_uid=model_uid, token_ids=token_ids)
        return self.generation.Detokenize(request, timeout=timeout).text

    def generate(
        self,
        model_uid: str,
        prompt: str | list[int],
        *,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
        **sampling: Any,
    ) -> Iterator[generate_pb2.GenerateResponse]:
        """Stream a completion. sampling: the GenerateRequest fields (max_tokens, temperature, ...).

        Stop iterating (or call .cancel() on the returned iterator) to cancel the request.
        """
        request = generate_pb2.GenerateRequest(model_uid=model_uid, **sampling)
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.extend(prompt)
        return self.generation.Generate(request, timeout=timeout, metadata=metadata)

    def chat(
        self,
        model_uid: str,
        messages: list[Mapping[str, Any]],
        *,
        tools: list[Mapping[str, Any]] | None = None,
        tool_choice: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> Iterator[generate_pb2.GenerateResponse]:
        """Stream a model's answer to a conversation: messages as {"role", "content", ...} (the
        ChatMessage fields), tools as {"name", "description", "parameters"} with parameters a JSON
        Schema (a dict, or JSON text). The last response carries tool_calls when the model called
        tools."""
        request = generate_pb2.GenerateRequest(model_uid=model_uid, tool_choice=tool_choice, **sampling)
        for message in messages:
            request.messages.append(_chat_message(message))
        for tool in tools or ():
            parameters = tool.get("parameters", "")
            request.tools.add(
                name=tool["name"],
                description=tool.get("description", ""),
                parameters=_json_text(parameters),
            )
        return self.generation.Generate(request, timeout=timeout)


def _chat_message(message: Mapping[str, Any]) -> generate_pb2.ChatMessage:
    calls = [
        generate_pb2.ToolCall(
            id=call.get("id", ""),
            name=call["name"],
            arguments=call["arguments"]
            if isinstance(call["arguments"], str)
            else json.dumps(call["arguments"]),
        )
        for call in message.get("tool_calls", ())
    ]
    return generate_pb2.ChatMessage(
        role=message["role"],
        content=message.get("content", ""),
        tool_calls=calls,
        tool_call_id=message.get("tool_call_id", ""),
        name=message.get("name", ""),
    )


def _json_text(value: Any) -> str:
    """JSON text as given, or a value written as JSON."""
    return value if isinstance(value, str) else json.dumps(value)
