"""Structured output: a request's format turned into a mask of allowed tokens at each step.

The grammar work is llguidance's (the library vLLM and SGLang also use; it runs on the
CPU, in Rust, with no torch): it compiles a JSON Schema, regular expression, list of
choices or Lark/GBNF grammar against the model's tokenizer, and at each step answers the
tokens that can continue a valid output, as a bitmask. Compiling costs milliseconds to
seconds for a big schema, so it happens once per format (cached) and at admission, off
the decode thread; a step costs one mask (tens of microseconds for small vocabularies).

llguidance is imported here only, and only when a request asks for a format: a request
without one pays nothing, and an environment without the library fails those requests
only, naming the extra to install.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from llmgrpc.clients.errors import FailedPrecondition, FieldViolation, InvalidArgument, Reason
from llmgrpc.engines.base import Constraint

# Compiled formats kept per model: a service answering for a few schemas compiles each once.
CACHE_SIZE = 64


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise FailedPrecondition(
            "structured_output needs the llguidance library in the engine's environment: "
            "pip install 'llmgrpc[structured]'",
            reason=Reason.ENGINE_UNAVAILABLE,
        ) from None
    return llguidance


def tokenizer_from_hugging_face(tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer (about a second: build it once)."""
    _llguidance()
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))


def tokenizer_from_llama_cpp(vocab: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> Any:
    """llguidance's view of a llama.cpp vocabulary (about a second: build it once)."""
    _llguidance()
    from llguidance.llamacpp import lltokenizer_from_vocab

    return lltokenizer_from_vocab(vocab, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))


def _grammar(constraint: Constraint) -> str:
    """The constraint as an llguidance grammar; ValueError with the reason if it is not one."""
    llguidance = _llguidance()
    kind, spec = constraint.kind, constraint.spec
    if kind == "json_object":
        return llguidance.grammar_from("json_schema", '{"type": "object"}')
    if kind == "json_schema":
        try:
            json.loads(spec)  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"not JSON: {error}") from None
        return llguidance.grammar_from("json_schema", spec)  # type: ignore[arg-type]
    if kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(list(spec)))
    if kind == "regex":
        return llguidance.grammar_from("regex", spec)  # type: ignore[arg-type]
    if kind == "grammar":
        return llguidance.grammar_from("grammar", spec)  # type: ignore[arg-type]
    raise ValueError(f"unknown structured_output kind {kind!r}")


def _rows_of_bits(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """llguidance's bitmask rows (int32 words, bit i of word w: token 32w+i) as boolean rows."""
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=-1, bitorder="little").view(bool)
    if allowed.shape[-1] >= vocab_size:
        return allowed[..., :vocab_size]
    missing = np.zeros((*allowed.shape[:-1], vocab_size - allowed.shape[-1]), dtype=bool)
    return np.concatenate([allowed, missing], axis=-1)


class ConstraintState:
    """One request's progress through its format: which tokens may come next."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self._vocab_size = vocab_size

    def allowed(self) -> np.ndarray:
        """A boolean row over the vocabulary: True where a token may come next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return _rows_of_bits(bits, self._vocab_size)

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    @property
    def complete(self) -> bool:
        """The output satisfies the format and nothing more may follow."""
        return bool(self.matcher.is_stopped())


class GrammarCompiler:
    """Compiles formats against one model's tokenizer, each format once (an LRU cache).

    make_tokenizer builds llguidance's tokenizer (about a second), on the first format
    asked for. compile() is called from several threads at once."""

    def __init__(self, make_tokenizer: Callable[[], Any], vocab_size: int, cache_size: int = CACHE_SIZE):
        self._make_tokenizer = make_tokenizer
        self._tokenizer: Any = None
        self._vocab_size = vocab_size
        self._cache: OrderedDict[Constraint, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._executor: Any = None

    def allowed_rows(self, states: list[ConstraintState]) -> np.ndarray:
        """The allowed tokens of several states at once, a boolean row each: one call into the
        library per decode step, not one per sequence (each call releases and retakes the GIL,
        which costs milliseconds when other threads of the worker are busy)."""
        from llguidance.numpy import fill_next_token_bitmask_par

        if self._executor is None:
            # One thread: the engine's own threads have the cores; a mask takes microseconds.
            self._executor = _llguidance().LLExecutor(num_threads=1)
        words = (self._vocab_size + 31) // 32
        bitmask = np.full((len(states), words), -1, dtype=np.int32)
        fill_next_token_bitmask_par(
            self._executor, [(state.matcher, row) for row, state in enumerate(states)], bitmask
        )
        return _rows_of_bits(bitmask, self._vocab_size)

    def compile(self, constraint: Constraint) -> ConstraintState:
        """A fresh state for constraint; InvalidArgument naming its field if it does not compile."""
        with self._lock:
            compiled = self._cache.get(constraint)
            if compiled is not None:
                self._cache.move_to_end(constraint)
                return ConstraintState(compiled.deep_copy(), self._vocab_size)
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            tokenizer = self._tokenizer
        llguidance = _llguidance()
        try:
            grammar = _grammar(constraint)
            # Compiling releases the GIL: other streams keep decoding meanwhile.
            compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            error = compiled.get_error() if compiled.is_error() else ""
        except ValueError as raised:
            error = str(raised)
        if error:
            raise InvalidArgument(
                f"invalid {constraint.field}: {error}",
                [FieldViolation(constraint.field, error)],
                reason=Reason.INVALID_FIELD,
            )
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return ConstraintState(compiled.deep_copy(), self._vocab_size)
