"""Engine options: how an engine declares the engine_options keys it takes, and the one check of them.

Each engine's ``EngineInfo`` (``llmgrpc.engines.catalogue``, or a plugin's own) declares its
options and its rules between them (``EngineInfo.option_rules``). The server applies both once,
admitting a launch before any worker starts: ``validate_engine_options``, then the rules once
the device is known. The engines load the plan as given, checking it no more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmgrpc.clients.errors import FieldViolation, InvalidArgument, Reason

if TYPE_CHECKING:
    from llmgrpc.engines.catalogue import EngineInfo


@dataclass(frozen=True)
class EngineOption:
    """One engine_options key an engine takes: its JSON type, what it does, and its valid values.

    Numbers must lie in [minimum, maximum] (or (minimum, maximum] with exclusive_minimum);
    strings with choices must be one of them. validate_engine_options checks all of it on the
    server, before a worker starts, so a value the engine would refuse is refused first.
    """

    name: str
    kind: type  # bool, int, float or str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    # (option, value): setting this one means that option has that value; another is refused.
    implies: tuple[str, str] | None = None

    def describe(self) -> str:
        """The option for a message or a listing: "n_threads (an int in [1, 1024]: what it does)"."""
        return f"{self.name} ({self.valid_values()}: {self.help})"

    def valid_values(self) -> str:
        """What the option takes, as words that follow "must be": "one of f16, f32", "an int in [1, 8]"."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        article = "an" if self.kind is int else "a"
        if self.minimum is None and self.maximum is None:
            return f"{article} {self.kind.__name__}"
        low = "-inf" if self.minimum is None else _shown(self.minimum)
        high = "inf" if self.maximum is None else _shown(self.maximum)
        return f"{article} {self.kind.__name__} in {'(' if self.exclusive_minimum else '['}{low}, {high}]"

    def accepts(self, value: object) -> bool:
        """Whether value, as JSON gave it, is of this option's type and among its valid values."""
        if isinstance(value, bool) is not (self.kind is bool):
            return False
        if self.kind not in (int, float):
            return isinstance(value, self.kind) and (not self.choices or value in self.choices)
        if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
            return False
        # JSON (and so protobuf Struct) numbers are floats: accept whole ones for int options.
        if self.kind is int and isinstance(value, float) and not value.is_integer():
            return False
        if self.minimum is not None and (
            value <= self.minimum if self.exclusive_minimum else value < self.minimum
        ):
            return False
        return self.maximum is None or value <= self.maximum


def _shown(value: object) -> str:
    """value for a message: numbers to 6 significant digits (never a 300-digit echo), text clipped."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value) < 10**15:
        return str(value)
    if isinstance(value, (int, float)):
        try:
            return f"{float(value):.6g}"
        except OverflowError:  # an int beyond any float
            return "a number above 1e308" if value > 0 else "a number below -1e308"
    return _clipped(repr(value))


def _clipped(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_engine_options(info: EngineInfo, options: dict) -> None:
    """Refuse engine_options the engine does not take, of the wrong JSON type, out of range or
    not one of the option's choices, naming the option and what it takes."""
    known = {option.name: option for option in info.options}
    for name, value in options.items():
        option = known.get(name)
        if option is None:
            valid = "; ".join(each.describe() for each in info.options)
            raise InvalidArgument(
                f"engine_options.{_clipped(name)} is not an option of {info.name}; "
                f"valid options: {valid or 'none'}",
                reason=Reason.ENGINE_OPTION_INVALID,
            )
        if not option.accepts(value):
            raise InvalidArgument(
                f"engine_options.{name} must be {option.valid_values()}, got {_shown(value)}",
                reason=Reason.ENGINE_OPTION_INVALID,
            )
    for name in options:
        implied = known[name].implies
        if implied is not None and implied[0] in options and options[implied[0]] != implied[1]:
            other, value = implied
            raise InvalidArgument(
                f"engine_options.{name} means {other} {value}, and {other} {_shown(options[other])} "
                "contradicts it",
                [FieldViolation(f"engine_options.{other}", f"must be {value}, or unset, with {name}")],
                reason=Reason.ENGINE_OPTION_INVALID,
            )
