"""TGIS (IBM text-generation-inference's fmaas.GenerationService), translated to llmgrpc.v1 requests.

Each prompt becomes a ``GenerateRequest`` (model_id is the model_uid) handed to the same
``EngineManager.generate`` the llmgrpc.v1 GenerateService calls; Tokenize is the manager's
tokenize, so its count is the prompt's token count Generate reports. Parameters llmgrpc has
no counterpart for (typical_p, length penalties, per-token details, prompt-tuning prefixes)
are refused with INVALID_ARGUMENT rather than ignored.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from llmgrpc.clients.errors import FieldViolation, InvalidArgument, Reason
from llmgrpc.server import logs
from llmgrpc.server.launched import AdmissionGate
from llmgrpc.server.manager import EngineManager
from llmgrpc.server.validation import check_generate, check_model_uid
from llmgrpc.tgis.v1 import generation_pb2 as pb
from llmgrpc.tgis.v1 import generation_pb2_grpc as pb_grpc
from llmgrpc.v1 import generate_pb2

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
DEFAULT_MAX_NEW_TOKENS = 20  # TGIS's own default for max_new_tokens 0
MAX_SEED = 2**63 - 1  # GenerateRequest.seed is an int64


def _invalid(what: str, violations: list[FieldViolation]) -> InvalidArgument:
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return InvalidArgument(f"invalid {what}: {summary}", violations, reason=Reason.INVALID_FIELD)


def _unsupported(params: pb.Parameters, prefix_id: bool) -> list[FieldViolation]:
    """The parameters llmgrpc cannot honour, each named."""
    violations = []

    def refuse(field: str, description: str) -> None:
        violations.append(FieldViolation(field, description))

    if prefix_id:
        refuse("prefix_id", "prompt-tuning prefixes are not supported")
    if params.sampling.typical_p:
        refuse("params.sampling.typical_p", "typical sampling is not supported: must be 0")
    if params.stopping.include_stop_sequence:
        refuse("params.stopping.include_stop_sequence", "stop sequences are always cut: unset or false")
    if params.decoding.HasField("length_penalty"):
        refuse("params.decoding.length_penalty", "length penalties are not supported")
    response = params.response
    for name in ("generated_tokens", "input_tokens", "token_logprobs", "token_ranks", "top_n_tokens"):
        if getattr(response, name):
            refuse(f"params.response.{name}", "per-token details are not supported")
    return violations


def _structured_output(decoding: pb.DecodingParameters) -> generate_pb2.StructuredOutput | None:
    guided = decoding.WhichOneof("guided")
    if guided is None or (guided == "format" and decoding.format == pb.DecodingParameters.TEXT):
        return None
    if guided == "format":
        return generate_pb2.StructuredOutput(json_object=True)
    if guided == "choice":
        return generate_pb2.StructuredOutput(choice=generate_pb2.Choice(choices=decoding.choice.choices))
    return generate_pb2.StructuredOutput(**{guided: getattr(decoding, guided)})


def check_batch_size(prompts: int, gate: AdmissionGate) -> None:
    """A batch larger than the model ever admits at once (running and waiting) can never run:
    INVALID_ARGUMENT naming the limit, not a RESOURCE_EXHAUSTED that a retry could not fix."""
    limit = gate.max_running + gate.max_waiting
    if prompts > limit:
        description = (
            f"{prompts} prompts in one batch: the model admits at most {limit} requests at once "
            f"({gate.max_running} running and {gate.max_waiting} waiting); send at most {limit} a batch"
        )
        raise _invalid("BatchedGenerationRequest", [FieldViolation("requests", description)])


@dataclass(frozen=True)
class Generation:
    """One TGIS prompt in domain terms: the GenerateRequest and what the answer reports."""

    request: generate_pb2.GenerateRequest
    seed: int  # reported back; 0 for greedy decoding
    input_text: bool
    time_limit_s: float | None

    @classmethod
    def from_pb(
        cls, model_id: str, text: str, params: pb.Parameters, *, prefix_id: bool, adapter_id: str
    ) -> Generation:
        """adapter_id: a LoRA adapter of the model, by name (GenerateRequest.adapter)."""
        violations = _unsupported(params, prefix_id)
        if violations:
            raise _invalid("generation request", violations)
        check_model_uid(model_id)
        sampling, stopping = params.sampling, params.stopping
        request = generate_pb2.GenerateRequest(
            model_uid=model_id,
            prompt=text,
            max_tokens=stopping.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
            stop=stopping.stop_sequences,
            adapter=adapter_id,
        )
        seed = 0
        if params.method == pb.GREEDY:
            request.temperature = 0.0
        else:
            if sampling.HasField("temperature"):
                request.temperature = sampling.temperature
            if sampling.top_k:
                request.top_k = sampling.top_k
            if sampling.top_p:
                request.top_p = sampling.top_p
            # As TGIS: a sampled request without a seed gets one, and reports it.
            seed = sampling.seed if sampling.HasField("seed") else secrets.randbelow(MAX_SEED)
            if seed > MAX_SEED:
                raise _invalid(
                    "generation request", [FieldViolation("params.sampling.seed", f"at most {MAX_SEED}")]
                )
            request.seed = seed
        if stopping.min_new_tokens:
            request.min_tokens = stopping.min_new_tokens
        if params.decoding.repetition_penalty:
            request.repetition_penalty = params.decoding.repetition_penalty
        if params.truncate_input_tokens:
            request.truncate_prompt_tokens = params.truncate_input_tokens
        structured = _structured_output(params.decoding)
        if structured is not None:
            request.structured_output.CopyFrom(structured)
        check_generate(request)
        return cls(
            request=request,
            seed=seed,
            input_text=params.response.input_text,
            time_limit_s=stopping.time_limit_millis / 1000 if stopping.time_limit_millis else None,
        )

    def response(
        self, text: str, last: generate_pb2.GenerateResponse | None, generated: int
    ) -> pb.GenerationResponse:
        """A GenerationResponse; last: Generate's final message (None for a piece before it)."""
        response = pb.GenerationResponse(text=text, generated_token_count=generated, seed=self.seed)
        if last is not None:
            response.input_token_count = last.usage.prompt_tokens
            response.generated_token_count = last.usage.completion_tokens
            response.stop_reason = self.stop_reason(last)
            if last.WhichOneof("matched_stop") == "stop_string":
                response.stop_sequence = last.stop_string
        return response

    def stop_reason(self, last: generate_pb2.GenerateResponse) -> int:
        if last.finish_reason == generate_pb2.FINISH_REASON_LENGTH:
            # max_tokens reached, or else the model's context was full.
            full = last.usage.completion_tokens < self.request.max_tokens
            return pb.TOKEN_LIMIT if full else pb.MAX_TOKENS
        if last.finish_reason == generate_pb2.FINISH_REASON_CANCELLED:
            return pb.CANCELLED
        return pb.STOP_SEQUENCE if last.WhichOneof("matched_stop") == "stop_string" else pb.EOS_TOKEN


class TgisServicer(pb_grpc.GenerationServiceServicer):
    """fmaas.GenerationService: each RPC converts at the boundary and calls the manager."""

    def __init__(self, manager: EngineManager):
        self.manager = manager

    async def _pieces(
        self, generation: Generation, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerationResponse]:
        """The generation's messages as TGIS pieces; the last has the stop reason and counts."""
        responses = self.manager.generate(generation.request, context.time_remaining())
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + generation.time_limit_s if generation.time_limit_s else None
        generated = 0
        try:
            while True:
                try:
                    remaining = None if ends_at is None else max(0.0, ends_at - loop.time())
                    response = await asyncio.wait_for(responses.__anext__(), remaining)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:  # the engine's work stops as the stream closes
                    yield pb.GenerationResponse(
                        generated_token_count=generated, stop_reason=pb.TIME_LIMIT, seed=generation.seed
                    )
                    return
                generated += len(response.token_ids)
                last = response if response.finish_reason else None
                yield generation.response(response.text, last, generated)
        finally:
            await responses.aclose()

    async def _generate_whole(
        self, generation: Generation, index: int, context: grpc.aio.ServicerContext
    ) -> pb.GenerationResponse:
        """The batch's prompt index, whole; run in a task of its own, which takes its id."""
        logs.adopt_part_id(index)
        texts = [generation.request.prompt] if generation.input_text else []
        async for piece in self._pieces(generation, context):
            texts.append(piece.text)
            if piece.stop_reason != pb.NOT_FINISHED:
                piece.text = "".join(texts)
                return piece
        raise RuntimeError("a generation ended without a stop reason")

    async def Generate(self, request: pb.BatchedGenerationRequest, context):
        """Every prompt of the batch at once; one that fails fails the call and stops the others."""
        generations = [
            Generation.from_pb(
                request.model_id,
                prompt.text,
                request.params,
                prefix_id=request.HasField("prefix_id"),
                adapter_id=request.adapter_id,
            )
            for prompt in request.requests
        ]
        check_batch_size(len(generations), self.manager.get(request.model_id).gate)
        tasks = [
            asyncio.ensure_future(self._generate_whole(generation, index, context))
            for index, generation in enumerate(generations)
        ]
        try:
            responses = await asyncio.gather(*tasks)
        finally:  # one failed, or the caller left: the others stop too
            for task in tasks:
                task.cancel()
        return pb.BatchedGenerationResponse(responses=responses)

    async def GenerateStream(self, request: pb.SingleGenerationRequest, context):
        generation = Generation.from_pb(
            request.model_id,
            request.request.text,
            request.params,
            prefix_id=request.HasField("prefix_id"),
            adapter_id=request.adapter_id,
        )
        if generation.input_text:
            yield pb.GenerationResponse(text=generation.request.prompt, seed=generation.seed)
        async for piece in self._pieces(generation, context):
            if piece.text or piece.stop_reason != pb.NOT_FINISHED:
                yield piece

    async def Tokenize(self, request: pb.BatchedTokenizeRequest, context):
        # An adapter changes no tokenizer: adapter_id is allowed and changes nothing here.
        violations = _unsupported(pb.Parameters(), request.HasField("prefix_id"))
        if request.return_offsets:
            violations.append(FieldViolation("return_offsets", "offsets are not supported"))
        if violations:
            raise _invalid("BatchedTokenizeRequest", violations)
        check_model_uid(request.model_id)
        responses = []
        for text in request.requests:
            tokenized = await self.manager.call_model(
                generate_pb2.TokenizeRequest(model_uid=request.model_id, text=text.text),
                context.time_remaining(),
            )
            tokens = list(tokenized.tokens)
            count = len(tokenized.token_ids)
            if request.truncate_input_tokens and count > request.truncate_input_tokens:
                # As TGIS: the prompt's start goes, its last tokens stay.
                count = request.truncate_input_tokens
                tokens = tokens[-count:]
            responses.append(
                pb.TokenizeResponse(token_count=count, tokens=tokens if request.return_tokens else [])
            )
        return pb.BatchedTokenizeResponse(responses=responses)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context):
        check_model_uid(request.model_id)
        model = await self.manager.refresh(self.manager.get(request.model_id))
        context_length = model.engine_stats.context_length
        return pb.ModelInfoResponse(
            model_kind=pb.ModelInfoResponse.DECODER_ONLY,
            max_sequence_length=context_length,
            max_new_tokens=context_length,
        )
