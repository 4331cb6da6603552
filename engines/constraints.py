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

The library never raises for a format it cannot follow: its matcher enters an error state
(and then also reports itself stopped). So a format is tried once at admission (its first
mask: a format that matches nothing fails there), and a request's matcher is checked at
every step; one that fails mid-output (the library reached one of its limits) ends the
stream with INVALID_ARGUMENT naming the field, never as if the output were complete.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from llmgrpc.clients.errors import FailedPrecondition, InvalidArgument, Reason
from llmgrpc.engines.base import Constraint

log = logging.getLogger(__name__)

# Compiled formats kept per model: a service answering for a few schemas compiles each once.
CACHE_SIZE = 64
# The library's word for a state no token can continue: at the start, a format nothing satisfies.
_NOTHING_MATCHES = "NoExtensionBias"


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
    if kind == "json_schema":  # JSON the server has read (validation.parse_json)
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


def _library_error(text: str) -> str:
    """The library's error message as a caller may see it: its first line; never a panic's text
    (a Rust panic message and backtrace say nothing about the format: logged instead)."""
    if "panic" in text or "backtrace" in text:
        log.error("the grammar library failed: %s", text)
        return "the grammar library failed on it (an internal error of the library; see the server log)"
    first = text.strip().splitlines()[0] if text.strip() else "unknown error"
    if first == _NOTHING_MATCHES:
        return "no output can satisfy it (it matches nothing, or never ends)"
    return first


class ConstraintState:
    """One request's progress through its format: which tokens may come next."""

    def __init__(self, matcher: Any, vocab_size: int, constraint: Constraint):
        self.matcher = matcher
        self._vocab_size = vocab_size
        self._constraint = constraint

    def allowed(self) -> np.ndarray:
        """A boolean row over the vocabulary: True where a token may come next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return _rows_of_bits(bits, self._vocab_size)

    def accept(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    def failure(self, generated: int) -> InvalidArgument | None:
        """The error that ends the request if the library has failed on its format (after
        generated tokens), else None. Checked after every mask and every token."""
        if not self.matcher.is_error():
            return None
        problem = _library_error(self.matcher.get_error())
        return self._constraint.invalid(
            f"the grammar library gave up on this format after {generated} generated tokens: {problem}; "
            "the output so far does not satisfy it (simplify the format)",
        )

    @property
    def complete(self) -> bool:
        """The output satisfies the format and nothing more may follow (a matcher in its error
        state reports itself stopped too: that is no completion)."""
        return bool(self.matcher.is_stopped()) and not self.matcher.is_error()


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
        """A fresh state for constraint; InvalidArgument naming its field if it does not compile,
        exceeds the library's limits, or can match nothing."""
        with self._lock:
            compiled = self._cache.get(constraint)
            if compiled is not None:
                self._cache.move_to_end(constraint)
                return ConstraintState(compiled.deep_copy(), self._vocab_size, constraint)
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            tokenizer = self._tokenizer
        compiled = self._checked_matcher(constraint, tokenizer)
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return ConstraintState(compiled.deep_copy(), self._vocab_size, constraint)

    def _checked_matcher(self, constraint: Constraint, tokenizer: Any) -> Any:
        """The format's matcher, compiled and tried on its first step (off the decode thread)."""
        llguidance = _llguidance()
        try:
            grammar = _grammar(constraint)
            # Terse errors: verbose ones quote the parser's state. Compiling releases the GIL:
            # other streams keep decoding meanwhile.
            limits = llguidance.LLParserLimits(verbose_errors=False)
            compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
            if not compiled.is_error():
                first_step = compiled.deep_copy()  # the first mask finds a format nothing satisfies
                first_step.compute_bitmask()
                if first_step.is_error():
                    compiled = first_step
            error = _library_error(compiled.get_error()) if compiled.is_error() else ""
        except ValueError as raised:
            error = _library_error(str(raised))
        except BaseException as raised:  # a Rust panic is a BaseException (pyo3's PanicException)
            if type(raised).__name__ != "PanicException":
                raise
            error = _library_error(f"panic: {raised}")
        if error:
            raise constraint.invalid(error)
        return compiled
