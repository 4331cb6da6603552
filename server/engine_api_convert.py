"""vLLM engine contract <-> llmgrpc: a gateway's Generate in domain terms, and its answers.

Owner: the vLLM engine contract (``llmgrpc.server.engine_api``). Pure conversion and
validation: ``EngineGeneration.from_pb`` turns a ``vllm.grpc.engine.GenerateRequest`` into
one ``llmgrpc.v1.GenerateRequest`` per sample (``n``), refusing with INVALID_ARGUMENT what
llmgrpc cannot honour (naming the field and what is valid) instead of ignoring it;
``chunk_to_pb`` and ``complete_to_pb`` turn Generate's messages back into the contract's
``GenerateStreamChunk`` and ``GenerateComplete``.

Fields that need no conversion: ``skip_special_tokens`` and ``spaces_between_special_tokens``
shape text, and this contract carries token ids only (the gateway detokenizes);
``grammar_from_first_token`` is always so here (llmgrpc runs no reasoning parser).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from smg_grpc_proto.generated import vllm_engine_pb2 as pb

from llmgrpc.clients.client import SAMPLING_KNOBS
from llmgrpc.clients.errors import FieldViolation, InvalidArgument, Reason
from llmgrpc.engines.base import MAX_LOGPROBS
from llmgrpc.server.validation import check_generate
from llmgrpc.v1 import generate_pb2

# The most samples one request may ask for (n): each is a request of its own in the batch.
MAX_N = 16
FINISH_REASONS = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_CANCELLED: "abort",
    generate_pb2.FINISH_REASON_TOOL_CALLS: "stop",
}

# vLLM's sampling fields, by name: GenerateRequest's knobs of the same name mean the same.
VLLM_SAMPLING_FIELDS = pb.SamplingParams.DESCRIPTOR.fields_by_name
# Knobs read in a way of their own: a seed per sample, and truncate_prompt_tokens' -1.
KNOBS_READ_APART = ("seed", "truncate_prompt_tokens")


def _invalid(violations: list[FieldViolation]) -> InvalidArgument:
    summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
    return InvalidArgument(
        f"invalid vllm.grpc.engine.GenerateRequest: {summary}", violations, reason=Reason.INVALID_FIELD
    )


def _unsupported(request: pb.GenerateRequest) -> list[FieldViolation]:
    """What the request asks for that llmgrpc cannot do, each field named."""
    violations: list[FieldViolation] = []

    def refuse(name: str, description: str) -> None:
        violations.append(FieldViolation(name, description))

    if request.HasField("mm_inputs") or request.extra_mm_inputs or request.HasField("media_refs"):
        refuse("mm_inputs", "multimodal inputs are not supported: llmgrpc serves text models")
    if request.HasField("kv_transfer_params") or request.HasField("kv_transfer_params_json"):
        refuse("kv_transfer_params", "disaggregated prefill and decode are not supported")
    if request.HasField("data_parallel_rank") and request.data_parallel_rank != 0:
        refuse("data_parallel_rank", "the engine has one data-parallel rank: 0 or unset")
    sampling = request.sampling_params
    if sampling.HasField("prompt_logprobs"):
        refuse("sampling_params.prompt_logprobs", "prompt log-probabilities are not supported: unset")
    if sampling.include_stop_str_in_output:
        refuse("sampling_params.include_stop_str_in_output", "stop strings are always cut: false")
    if sampling.WhichOneof("constraint") == "structural_tag":
        refuse(
            "sampling_params.structural_tag",
            "structural tags are not supported: json_schema, regex, grammar, choice or json_object",
        )
    if sampling.HasField("logprobs") and not 0 <= sampling.logprobs <= MAX_LOGPROBS:
        refuse("sampling_params.logprobs", f"0 to {MAX_LOGPROBS} (-1, every token, is not supported)")
    if sampling.n > MAX_N:
        refuse("sampling_params.n", f"at most {MAX_N} samples per request")
    if request.WhichOneof("input") is None:
        refuse("input", "set tokenized.input_ids or text")
    elif request.WhichOneof("input") == "tokenized" and not request.tokenized.input_ids:
        refuse("tokenized.input_ids", "the prompt is empty: at least one token id")
    return violations


def _structured_output(sampling: pb.SamplingParams) -> generate_pb2.StructuredOutput | None:
    kind = sampling.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "choice":
        return generate_pb2.StructuredOutput(choice=generate_pb2.Choice(choices=sampling.choice.choices))
    return generate_pb2.StructuredOutput(**{kind: getattr(sampling, kind)})


def _base_request(
    model_uid: str, request: pb.GenerateRequest, context_length: int
) -> generate_pb2.GenerateRequest:
    """The request every sample shares (its seed set per sample)."""
    sampling = request.sampling_params
    generate = generate_pb2.GenerateRequest(
        model_uid=model_uid,
        stop=sampling.stop,
        stop_token_ids=sampling.stop_token_ids,
        ignore_eos=sampling.ignore_eos,
        logit_bias=dict(sampling.logit_bias),
    )
    if request.WhichOneof("input") == "tokenized":
        generate.prompt_token_ids.extend(request.tokenized.input_ids)
    else:
        generate.prompt = request.text
    for name in SAMPLING_KNOBS:
        field = VLLM_SAMPLING_FIELDS.get(name)
        if field is None or name in KNOBS_READ_APART:
            continue
        if field.has_presence:
            if sampling.HasField(name):
                setattr(generate, name, getattr(sampling, name))
        # proto3 scalars: 0 is "unset" for the fields vLLM gives a neutral value other than 0.
        elif value := getattr(sampling, name):
            setattr(generate, name, value)
    if sampling.HasField("truncate_prompt_tokens"):
        # -1: the model's whole context, as vLLM reads it.
        truncate = sampling.truncate_prompt_tokens
        generate.truncate_prompt_tokens = context_length if truncate == -1 and context_length else truncate
    structured = _structured_output(sampling)
    if structured is not None:
        generate.structured_output.CopyFrom(structured)
    return generate


@dataclass(frozen=True)
class EngineGeneration:
    """A gateway's Generate in domain terms: one llmgrpc request per sample, and how to answer."""

    request_id: str
    samples: list[generate_pb2.GenerateRequest]
    stream: bool
    prompt_tokens: int  # known up front for tokenized input (0 for text until the end)

    @classmethod
    def from_pb(cls, request: pb.GenerateRequest, model_uid: str, context_length: int) -> EngineGeneration:
        violations = _unsupported(request)
        if violations:
            raise _invalid(violations)
        base = _base_request(model_uid, request, context_length)
        sampling = request.sampling_params
        samples = []
        for index in range(max(sampling.n, 1)):
            sample = generate_pb2.GenerateRequest()
            sample.CopyFrom(base)
            if sampling.HasField("seed"):
                sample.seed = sampling.seed + index  # one seed each, or n samples would be one
            samples.append(sample)
        try:
            check_generate(samples[0])
        except InvalidArgument as error:
            raise InvalidArgument(
                f"invalid vllm.grpc.engine.GenerateRequest (as llmgrpc.v1.GenerateRequest): {error}",
                error.violations,
                reason=error.reason,
                metadata=error.metadata,
            ) from None
        prompt_tokens = len(base.prompt_token_ids)
        if base.HasField("truncate_prompt_tokens"):
            prompt_tokens = min(prompt_tokens, base.truncate_prompt_tokens)
        return cls(
            request_id=request.request_id or uuid.uuid4().hex,
            samples=samples,
            stream=request.stream,
            prompt_tokens=prompt_tokens,
        )


def logprobs_to_pb(response: generate_pb2.GenerateResponse) -> pb.OutputLogProbs | None:
    """Generate's log-probabilities in the contract's shape (None when none were asked for)."""
    if not response.logprobs:
        return None
    return pb.OutputLogProbs(
        token_logprobs=[entry.logprob for entry in response.logprobs],
        token_ids=[entry.token_id for entry in response.logprobs],
        top_logprobs=[
            pb.TopLogProbs(
                values=[top.logprob for top in entry.top_logprobs],
                token_ids=[top.token_id for top in entry.top_logprobs],
            )
            for entry in response.logprobs
        ],
    )


def chunk_to_pb(
    response: generate_pb2.GenerateResponse, index: int, prompt_tokens: int, completion_tokens: int
) -> pb.GenerateResponse:
    """One Generate message as a stream chunk: its new token ids and the counts so far."""
    chunk = pb.GenerateStreamChunk(
        token_ids=response.token_ids,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=response.usage.cached_prompt_tokens,  # known with the last tokens
        index=index,
    )
    logprobs = logprobs_to_pb(response)
    if logprobs is not None:
        chunk.output_logprobs.CopyFrom(logprobs)
    return pb.GenerateResponse(chunk=chunk)


def complete_to_pb(
    last: generate_pb2.GenerateResponse,
    index: int,
    output_ids: list[int],
    logprobs: list[generate_pb2.TokenLogprob],
) -> pb.GenerateResponse:
    """Generate's last message as the sample's GenerateComplete (output_ids: all of the sample's
    tokens for a unary answer, none for a stream, whose chunks carried them)."""
    complete = pb.GenerateComplete(
        output_ids=output_ids,
        finish_reason=FINISH_REASONS.get(last.finish_reason, "stop"),
        prompt_tokens=last.usage.prompt_tokens,
        completion_tokens=last.usage.completion_tokens,
        cached_tokens=last.usage.cached_prompt_tokens,
        index=index,
    )
    if logprobs:
        complete.output_logprobs.CopyFrom(logprobs_to_pb(generate_pb2.GenerateResponse(logprobs=logprobs)))
    matched = last.WhichOneof("matched_stop")
    if matched == "stop_string":
        complete.matched_stop_str = last.stop_string
    elif matched == "stop_token_id":
        complete.matched_token_id = last.stop_token_id
    return pb.GenerateResponse(complete=complete)
