"""Continuous batching: one thread decodes every live sequence of a model together.

An engine supplies a ``ModelRunner`` (engines.model_runner: forward passes over its own KV
state); the
``ContinuousBatcher`` owns everything else: admitting requests between steps,
tokenizing, sampling each sequence with its own parameters and seed, settling text,
stop rules, and aborting a request at the next step after its caller goes away. All
runner calls but ``tokenize`` happen on the batcher's one thread, so runners need no locking.

No request may stall the others for long: a prompt is tokenized and checked before it
reaches the batcher's thread (a multi-megabyte one takes seconds), and each step has a
token budget (``max_num_batched_tokens``, vLLM's word): the decoding sequences' tokens go
first, and prompt parts take what is left, so a long prompt is prefilled a budget's worth
at a time between the decode steps of the sequences already running (a part deep in a long
prompt counting also the positions it attends to, where the runner says what they cost). A
step in which nothing decodes has a budget of its own, larger: it delays no stream. While
sequences decode, prompt parts are also paced in time: over the steps they take at most
``prefill_time_ratio`` times the time decoding takes, so a part that costs several decode steps
(deep in a long prompt, where attention reads all of it) is followed by decode-only steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from llmgrpc.clients.errors import FieldViolation, InvalidArgument, LlmgrpcError, Reason, Unavailable
from llmgrpc.engines.base import (
    Chunk,
    FinishReason,
    GenerationRequest,
    TokenLogprob,
    Tokens,
    Usage,
)
from llmgrpc.engines.constraints import ConstraintState, GrammarCompiler
from llmgrpc.engines.model_runner import ModelRunner
from llmgrpc.engines.sampling import Sampler, token_logprobs
from llmgrpc.engines.text import IncrementalDetokenizer, StopStringMatcher

log = logging.getLogger(__name__)


# How much nicer than the decode loop long texts are tokenized (docs/engines.md, "The step budget":
# a 12,288-token prompt's tokenizing once slowed a stream's steps beside it 5- to 15-fold).
TOKENIZER_NICENESS = 10
# Texts of at least this many characters are long (about 6 ms to tokenize on one core). Shorter
# ones keep the process's priority: a nicer thread can wait hundreds of milliseconds for a core
# while the decode loop's threads keep both busy, and a short request's first token waits on it.
LONG_TEXT_CHARACTERS = 16_384

# What a caller's queue receives: a chunk, or the error that ends its stream.
_Output = tuple[asyncio.Queue, "Chunk | BaseException"]


@dataclass
class _Sequence:
    id: int
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop  # the caller's: its output is put on queue there
    queue: asyncio.Queue[Chunk | BaseException]
    prompt_ids: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens the runner holds: fed, or found in its prefix cache
    cached: int = 0  # of those, found in its prefix cache
    stop_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    sampler: Sampler | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStringMatcher | None = None
    constraint: ConstraintState | None = None
    unreleased_ids: list[int] = field(default_factory=list)
    unreleased_logprobs: list[TokenLogprob] = field(default_factory=list)


class ContinuousBatcher:
    """Serves generate() calls on one runner, decoding all live sequences together."""

    # Prompts are cut at multiples of this many tokens, whatever runs beside them.
    PREFILL_CHUNK_TOKENS = 512
    # The engines' step budget, unless engine_options.max_num_batched_tokens says otherwise
    # (measured: docs/engines.md, "The step budget"); each engine has its chunk (CHUNK_TOKENS).
    DEFAULT_STEP_TOKENS = 128
    # The engines' step with nothing decoding: no stream's next token waits on it, and bigger
    # parts cost less per token (docs/engines.md, "The step budget").
    IDLE_STEP_TOKENS = 512
    # While sequences decode, prompt parts take at most this many times the decoding's time, over
    # the steps (engine_options.prefill_time_ratio; docs/engines.md, "The step budget").
    PREFILL_TIME_RATIO = 1.0
    # Prompts tokenized at once, off the batcher's thread: a huge one occupies one thread.
    TOKENIZER_THREADS = 2

    def __init__(
        self,
        runner: ModelRunner,
        max_batch_size: int,
        prefill_chunk_tokens: int | None = None,
        max_num_batched_tokens: int | None = None,
        idle_step_tokens: int | None = None,
        prefill_time_ratio: float | None = None,
    ):
        """prefill_chunk_tokens: where prompts are cut; max_num_batched_tokens: a step's token
        budget (default: one chunk); idle_step_tokens: the budget of a step in which no sequence
        decodes (default, and at least: max_num_batched_tokens); prefill_time_ratio: the time
        prompt parts may take per second of decoding while sequences decode (default: none, the
        first waiting prompt's next chunk goes in every step)."""
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.prefill_chunk_tokens = prefill_chunk_tokens or self.PREFILL_CHUNK_TOKENS
        self.max_num_batched_tokens = max_num_batched_tokens or self.prefill_chunk_tokens
        self.idle_step_tokens = max(idle_step_tokens or 0, self.max_num_batched_tokens)
        self.prefill_time_ratio = prefill_time_ratio
        # Seconds of prompt parts the decoding sequences allow now (below 0: parts wait).
        self._prefill_credit = 0.0
        self.peak_batch_size = 0
        self.prefix_cache_queries = self.prefix_cache_hits = 0  # in tokens
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: deque[_Sequence] = deque()
        self._aborted: set[int] = set()
        self._active: dict[int, _Sequence] = {}
        self._prefilling: dict[int, _Sequence] = {}  # admitted, prompt not yet all fed; oldest first
        self._closed = False
        # Output of the current step, per caller's event loop (batcher thread only; see _send).
        self._outgoing: dict[asyncio.AbstractEventLoop, list[_Output]] = {}
        self._tokenizers = concurrent.futures.ThreadPoolExecutor(
            self.TOKENIZER_THREADS, thread_name_prefix="tokenize"
        )
        self._long_text_tokenizers = concurrent.futures.ThreadPoolExecutor(
            self.TOKENIZER_THREADS, thread_name_prefix="tokenize-long", initializer=_lower_tokenizer_priority
        )
        # Builds nothing until a request asks for a format.
        self._grammars = GrammarCompiler(runner.grammar_tokenizer, runner.vocab_size)
        self._thread = threading.Thread(target=self._run, name="continuous-batcher", daemon=True)
        self._thread.start()

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of the KV capacity (context length for each of max_batch_size sequences)
        that the live sequences' prompt and output tokens hold."""
        with self._lock:
            live = [*self._active.values(), *self._prefilling.values()]
        held = sum(sequence.prefilled + len(sequence.output_ids) for sequence in live)
        return min(held / max(self.runner.context_length * self.max_batch_size, 1), 1.0)

    @property
    def running_requests(self) -> int:
        with self._lock:
            return len(self._active) + len(self._prefilling) + len(self._pending)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        sequence = _Sequence(id=next(self._ids), request=request, loop=loop, queue=queue)
        if self._closed:
            raise Unavailable("the engine is shutting down")
        # Tokenizing costs time in proportion to the prompt (seconds for megabytes): it runs
        # here, before the sequence is queued, so no decoding stream ever waits for it.
        await loop.run_in_executor(self._tokenizers_for(_text_characters(request)), self._prepare, sequence)
        with self._lock:
            if self._closed:
                raise Unavailable("the engine is shutting down")
            self._pending.append(sequence)
            self._wake.notify()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                with self._lock:
                    self._aborted.add(sequence.id)
                    self._wake.notify()

    def _tokenizers_for(self, characters: int) -> concurrent.futures.ThreadPoolExecutor:
        """The pool that tokenizes a text of this many characters: the nicer one for long texts."""
        return self._long_text_tokenizers if characters >= LONG_TEXT_CHARACTERS else self._tokenizers

    async def tokenize(self, text: str, parse_special: bool = False) -> Tokens:
        """text's tokens as a prompt's, in the tokenizer pool (a huge text occupies one thread)."""
        runner = self.runner

        def tokenize() -> Tokens:
            ids = runner.tokenize(text, parse_special)
            return Tokens(ids, [runner.token_text(token) for token in ids])

        return await asyncio.get_running_loop().run_in_executor(self._tokenizers_for(len(text)), tokenize)

    async def detokenize(self, token_ids: list[int]) -> str:
        self._check_vocabulary("token_ids", token_ids)
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenizers_for(len(token_ids) * 4),  # about 4 characters a token
            self.runner.detokenize,
            token_ids,
        )

    def _check_vocabulary(self, field_name: str, token_ids) -> None:
        vocab_size = self.runner.vocab_size
        out_of_range = [t for t in token_ids if not 0 <= t < vocab_size]
        if out_of_range:
            description = f"ids outside the vocabulary [0, {vocab_size}): {out_of_range[:5]}"
            raise InvalidArgument(
                f"{field_name} has {description}",
                [FieldViolation(field_name, description)],
                reason=Reason.TOKEN_OUT_OF_VOCABULARY,
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self._tokenizers.shutdown(wait=False)
        self._long_text_tokenizers.shutdown(wait=False)

    def _prepare(self, sequence: _Sequence) -> None:
        """Tokenize and check a new request (raising if it is invalid) and set up its state."""
        request, runner = sequence.request, self.runner
        if request.prompt_token_ids is not None:
            prompt_ids = list(request.prompt_token_ids)
            out_of_range = [t for t in prompt_ids if not 0 <= t < runner.vocab_size]
            if out_of_range:
                raise InvalidArgument(
                    f"prompt_token_ids has ids outside the vocabulary [0, {runner.vocab_size}): "
                    f"{out_of_range[:5]}",
                    reason=Reason.TOKEN_OUT_OF_VOCABULARY,
                )
        elif request.chat is not None:
            prompt_ids = runner.chat_prompt_ids(request.chat)
        else:
            prompt_ids = runner.tokenize(request.prompt or "", request.parse_special_tokens)
        params = request.sampling
        if params.truncate_prompt_tokens is not None:
            prompt_ids = prompt_ids[-params.truncate_prompt_tokens :]
        if not prompt_ids:
            raise InvalidArgument(
                "the prompt is empty: give prompt or prompt_token_ids", reason=Reason.PROMPT_EMPTY
            )
        if len(prompt_ids) >= runner.context_length:
            raise InvalidArgument(
                f"the prompt has {len(prompt_ids)} tokens but the model's context length is "
                f"{runner.context_length}: shorten the prompt to at most {runner.context_length - 1} "
                "tokens to leave room for generated ones",
                reason=Reason.PROMPT_TOO_LONG,
            )
        self._check_vocabulary("logit_bias", params.logit_bias)
        if params.constraint is not None:  # compiled now: a bad format fails before any output
            sequence.constraint = self._grammars.compile(params.constraint)
        sequence.prompt_ids = prompt_ids
        sequence.stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else runner.eos_token_ids
        )
        sequence.sampler = Sampler(params, prompt_ids)
        sequence.detokenizer = IncrementalDetokenizer(runner.detokenize)
        sequence.stops = StopStringMatcher(params.stop)

    # The batcher thread.

    def _has_work(self) -> bool:
        return bool(self._pending or self._active or self._prefilling or self._aborted)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._has_work()):
                    self._wake.wait()
                if self._closed:
                    doomed = [*self._active.values(), *self._prefilling.values(), *self._pending]
                    break
                aborted, self._aborted = self._aborted, set()
                if aborted:
                    self._pending = deque(s for s in self._pending if s.id not in aborted)
                room = self.max_batch_size - len(self._active) - len(self._prefilling)
                joiners = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
            for sequence_id in aborted:
                sequence = self._active.get(sequence_id) or self._prefilling.get(sequence_id)
                if sequence is not None:
                    self._forget(sequence)
            waiting = []
            for joiner in joiners:  # asked one by one: each admission may take what the next needs
                if self.runner.can_admit(joiner.request):
                    self._admit(joiner)
                else:
                    waiting.append(joiner)
            if waiting:
                with self._lock:
                    self._pending.extendleft(reversed(waiting))
            try:
                self._step()
            except Exception as error:  # a broken forward pass fails its requests, not the worker
                log.exception("decode step failed")
                for sequence in [*self._active.values(), *self._prefilling.values()]:
                    self._send(sequence, error)
                    self._forget(sequence)
            self._flush()
        for sequence in doomed:
            self._send(sequence, Unavailable("the engine was shut down"))
        self._flush()

    def _admit(self, sequence: _Sequence) -> None:
        """Hand a queued sequence to the runner, which may already hold a prefix of its prompt."""
        try:
            cached = self.runner.admit(sequence.id, sequence.prompt_ids, sequence.request)
        except Exception as error:  # this request fails, not the batch
            if not isinstance(error, LlmgrpcError):  # a caller's mistake (an unknown adapter) is no fault
                log.exception("admitting a sequence failed")
            self._send(sequence, error)
            return
        sequence.prefilled = sequence.cached = cached
        self._prefilling[sequence.id] = sequence
        if self.runner.caches_prefixes and sequence.request.cache_prompt:
            self.prefix_cache_queries += len(sequence.prompt_ids)
            self.prefix_cache_hits += cached

    def _send(self, sequence: _Sequence, item: Chunk | BaseException) -> None:
        """Queue item for sequence's caller; it goes out with the rest of the step (_flush)."""
        self._outgoing.setdefault(sequence.loop, []).append((sequence.queue, item))

    def _flush(self) -> None:
        """Hand the step's output to each caller's event loop in one call. Each
        call_soon_threadsafe wakes its loop, whose thread then competes with this one for the
        GIL: one wake-up per step, not one per sequence, keeps this thread from waiting."""
        for loop, items in self._outgoing.items():
            try:
                loop.call_soon_threadsafe(_put_each, items)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                pass
        self._outgoing = {}

    def _step(self) -> None:
        decoded = 0
        if self._active:
            started = time.perf_counter()
            batch = list(self._active.values())
            decoded = len(batch)
            self.peak_batch_size = max(self.peak_batch_size, len(batch))
            logits = self.runner.decode({s.id: s.output_ids[-1] for s in batch})
            masks = self._masks(batch)
            for sequence, row in zip(batch, logits, strict=True):
                self._advance(sequence, row, masks.get(sequence.id))
            self._allow_prefill(time.perf_counter() - started)
        if not self._prefilling:
            return
        if not decoded:
            self._prefill_credit = 0.0  # no stream waits: nothing owed
            self._prefill_next_parts(self.idle_step_tokens)
        elif self._prefill_credit >= 0:
            started = time.perf_counter()
            self._prefill_next_parts(self.max_num_batched_tokens - decoded, decoding=True)
            if self.prefill_time_ratio is not None:
                self._prefill_credit -= time.perf_counter() - started

    def _allow_prefill(self, decode_seconds: float) -> None:
        """Credit prompt parts with their share of a decode step's time. At most one step's share
        is saved up, so parts never come in a burst; a part that cost more than the credit leaves
        it below 0, and the next steps decode only until it is paid back."""
        if self.prefill_time_ratio is not None:
            share = self.prefill_time_ratio * decode_seconds
            self._prefill_credit = min(self._prefill_credit + share, share)

    def _part_cost(self, start: int, end: int, decoding: bool) -> float:
        """What the prompt tokens [start, end) take of a step's budget: their count, and while
        sequences decode, the positions they attend to in token equivalents (the runner's
        prefix_tokens_per_token). On the tiny model 12,000 tokens into a prompt, a 96-token part
        took 27 ms against a 1.4 ms decode step: counted as tokens, it slowed every stream's
        step 20-fold."""
        tokens = end - start
        per_token = self.runner.prefix_tokens_per_token
        if not (decoding and per_token):
            return tokens
        return tokens * (1 + (start + end) / 2 / per_token)

    def _prefill_next_parts(self, budget: int, decoding: bool = False) -> None:
        """Feed the runner prompt parts of at most budget tokens in all (the first waiting
        prompt's next chunk in any case, so that prompts always advance, then whatever fits);
        a sequence whose prompt is all in starts decoding.

        Each prompt is cut at multiples of prefill_chunk_tokens, whatever runs beside it (a
        part is one chunk or several in a row), so its output does not depend on its
        neighbours; one fed only in part goes to the back, so a long prompt never holds up
        the short ones that arrive after it. While sequences decode (decoding), a part also
        pays for attending to the prompt before it (_part_cost).
        """
        chunk = self.prefill_chunk_tokens
        fed: list[tuple[_Sequence, list[int]]] = []
        for sequence in self._prefilling.values():
            start, length = sequence.prefilled, len(sequence.prompt_ids)
            # To the next multiple of chunk (a prompt found partly in the prefix cache is cut
            # where it would be cut cold), then on by whole chunks while the budget lasts.
            end = min((start // chunk + 1) * chunk, length)
            if fed and self._part_cost(start, end, decoding) > budget:
                continue
            while end < length and self._part_cost(start, min(end + chunk, length), decoding) <= budget:
                end = min(end + chunk, length)
            fed.append((sequence, sequence.prompt_ids[start:end]))
            budget -= self._part_cost(start, end, decoding)
            if budget <= 0:
                break
        logits = self.runner.prefill([(sequence.id, part) for sequence, part in fed])
        for (sequence, part), row in zip(fed, logits, strict=True):
            sequence.prefilled += len(part)
            del self._prefilling[sequence.id]
            if sequence.prefilled < len(sequence.prompt_ids):
                self._prefilling[sequence.id] = sequence
            else:
                self._active[sequence.id] = sequence
                self._advance(sequence, row)

    def _masks(self, batch: list[_Sequence]) -> dict[int, np.ndarray]:
        """The allowed tokens of the batch's sequences that have a format, computed together."""
        constrained = [s for s in batch if s.constraint is not None]
        if not constrained:
            return {}
        rows = self._grammars.allowed_rows([s.constraint for s in constrained])  # type: ignore[misc]
        return {sequence.id: row for sequence, row in zip(constrained, rows, strict=True)}

    def _advance(self, sequence: _Sequence, logits: np.ndarray, allowed: np.ndarray | None = None) -> None:
        """Sample one token for sequence, release its settled text, finish it if it is done.
        allowed: its format's mask when computed with the batch's (else computed here)."""
        params = sequence.request.sampling
        assert sequence.sampler and sequence.detokenizer and sequence.stops
        stop_ids = sequence.stop_ids
        early = len(sequence.output_ids) < params.min_tokens
        constraint = sequence.constraint
        if constraint is not None:
            if allowed is None:
                allowed = constraint.allowed()
            if self._format_failed(sequence, constraint):
                return
        token = sequence.sampler.sample(logits, banned=stop_ids if early else (), allowed=allowed)
        sequence.output_ids.append(token)
        sequence.unreleased_ids.append(token)
        if params.logprobs is not None:
            sequence.unreleased_logprobs.append(self._logprob(logits, token, params.logprobs))
        if constraint is not None:
            constraint.accept(token)
            if self._format_failed(sequence, constraint):
                return

        finish: FinishReason | None = None
        stop: str | int | None = None
        text = ""
        nothing_more = False  # the output ends here without a stop string cutting it
        if token in stop_ids:
            finish, nothing_more, stop = FinishReason.STOP, True, token
        else:
            text, stopped = sequence.stops.feed(sequence.detokenizer.push(token))
            if stopped:
                finish, stop = FinishReason.STOP, sequence.stops.matched
            elif constraint is not None and constraint.complete:
                finish, nothing_more = FinishReason.STOP, True
            elif len(sequence.output_ids) >= params.max_tokens or (
                len(sequence.prompt_ids) + len(sequence.output_ids) >= self.runner.context_length
            ):
                finish, nothing_more = FinishReason.LENGTH, True
        if nothing_more:
            # Release what was held back for an incomplete character or a possible stop string.
            tail, stopped = sequence.stops.feed(sequence.detokenizer.flush())
            text += tail if stopped else tail + sequence.stops.flush()
        if finish is None and not text:
            return  # nothing settled yet: the token goes out with the next text
        chunk = Chunk(
            token_ids=sequence.unreleased_ids,
            text=text,
            finish_reason=finish,
            logprobs=sequence.unreleased_logprobs,
            stop=stop,
        )
        sequence.unreleased_ids, sequence.unreleased_logprobs = [], []
        if finish is not None:
            chunk.usage = Usage(len(sequence.prompt_ids), len(sequence.output_ids), sequence.cached)
            self._forget(sequence)
        self._send(sequence, chunk)

    def _format_failed(self, sequence: _Sequence, constraint: ConstraintState) -> bool:
        """End sequence with its format's error if the grammar library has failed on it."""
        error = constraint.failure(len(sequence.output_ids))
        if error is None:
            return False
        self._forget(sequence)
        self._send(sequence, error)
        return True

    def _logprob(self, logits: np.ndarray, token: int, alternatives: int) -> TokenLogprob:
        text = self.runner.token_text
        logprob, top = token_logprobs(logits, token, alternatives)
        return TokenLogprob(token, text(token), logprob, [(t, text(t), lp) for t, lp in top])

    def _forget(self, sequence: _Sequence) -> None:
        known = self._active.pop(sequence.id, None) or self._prefilling.pop(sequence.id, None)
        if known is not None:  # admitted: the runner knows it
            self.runner.release(sequence.id)


def _put_each(items: list[_Output]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _text_characters(request: GenerationRequest) -> int:
    """The characters a request's prompt has to tokenize (none for token ids)."""
    if request.prompt_token_ids is not None:
        return 0
    if request.chat is not None:
        return sum(len(message.content) for message in request.chat.messages)
    return len(request.prompt or "")


def _lower_tokenizer_priority() -> None:
    """Run this tokenizer thread TOKENIZER_NICENESS steps nicer than the process (Linux: each
    thread has its own). Tokenizing a long prompt takes a core for tens of milliseconds, and on a
    host with few cores the decode loop's compute threads then wait for it at every step."""
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        niceness = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(niceness + TOKENIZER_NICENESS, 19))
    except OSError:  # a container that forbids it: tokenize at the process's priority
        pass
