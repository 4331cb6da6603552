"""The model registry: families of specs, as data, in the shape Xinference uses.

Each ``*.json`` file under ``families/`` (and under the operator's ``families_dir``) is
one family: name, description, context length, languages, abilities and specs; each
spec a format, a size, its quantizations, a model id, the hubs that host it and the
engines that serve it. Adding a family is adding a file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llmgrpc.clients.errors import InvalidArgument, NotFound, Reason
from llmgrpc.engines.base import SpecRef
from llmgrpc.engines.catalogue import engine_info
from llmgrpc.v1 import models_pb2

BUILTIN_FAMILIES = Path(__file__).parent / "families"


@dataclass(frozen=True)
class ModelHub:
    name: str
    display_name: str
    model_id: str
    url: str

    def to_pb(self, unavailable_reason: str | None = None) -> models_pb2.ModelHub:
        return models_pb2.ModelHub(
            name=self.name,
            display_name=self.display_name,
            model_id=self.model_id,
            url=self.url,
            available=unavailable_reason is None,
            reason=unavailable_reason or "",
        )


@dataclass(frozen=True)
class ModelSpec:
    model_format: str
    size_in_billions: str
    quantizations: tuple[str, ...]
    engines: tuple[str, ...]
    model_id: str
    hubs: tuple[ModelHub, ...] = ()
    model_file_name_template: str = ""
    generator: str = ""  # set for models llmgrpc generates itself instead of downloading
    # GGUF quantizations published as several files: quantization -> its parts, in order, each
    # named by model_file_name_split_template ({quantization}, {part}).
    quantization_parts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    model_file_name_split_template: str = ""

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        return cls(
            model_format=data["model_format"],
            size_in_billions=str(data["model_size_in_billions"]),
            quantizations=tuple(data["quantizations"]),
            engines=tuple(engine_info(name).name for name in data["model_engines"]),
            model_id=data["model_id"],
            hubs=tuple(ModelHub(**hub) for hub in data.get("model_hubs", [])),
            model_file_name_template=data.get("model_file_name_template", ""),
            generator=data.get("generator", ""),
            quantization_parts=tuple(
                (quantization, tuple(parts))
                for quantization, parts in data.get("quantization_parts", {}).items()
            ),
            model_file_name_split_template=data.get("model_file_name_split_template", ""),
        )

    @property
    def size_billions(self) -> float:
        """The size as a number ("0_5" is 0.5 billion)."""
        return float(self.size_in_billions.replace("_", "."))

    def ref(self, model_name: str, quantization: str) -> SpecRef:
        return SpecRef(
            model_name=model_name,
            model_format=self.model_format,
            size_in_billions=self.size_in_billions,
            quantization=quantization,
            model_id=self.model_id,
            hubs=[{"name": h.name, "model_id": h.model_id, "url": h.url} for h in self.hubs],
            model_file_name_template=self.model_file_name_template,
            generator=self.generator,
            file_names=self.file_names(quantization),
        )

    def file_names(self, quantization: str) -> list[str]:
        """The GGUF files of quantization, in order (one, or its parts); empty for other formats."""
        parts = dict(self.quantization_parts).get(quantization)
        if parts:
            return [
                self.model_file_name_split_template.format(quantization=quantization, part=p) for p in parts
            ]
        if self.model_file_name_template:
            return [self.model_file_name_template.format(quantization=quantization)]
        return []


@dataclass(frozen=True)
class ModelFamily:
    model_name: str
    description: str
    context_length: int
    languages: tuple[str, ...]
    abilities: tuple[str, ...]
    specs: tuple[ModelSpec, ...]

    @classmethod
    def from_json(cls, data: dict) -> ModelFamily:
        return cls(
            model_name=data["model_name"],
            description=data["model_description"],
            context_length=int(data["context_length"]),
            languages=tuple(data["model_lang"]),
            abilities=tuple(data["model_ability"]),
            specs=tuple(ModelSpec.from_json(spec) for spec in data["model_specs"]),
        )


@dataclass(frozen=True)
class SpecQuery:
    """The words of a ListSpecs filter or a launch; empty means any."""

    model_name: str = ""
    model_engine: str = ""
    model_format: str = ""
    size_in_billions: str = ""
    quantization: str = ""

    @classmethod
    def from_pb(cls, pb) -> SpecQuery:
        """The query of any request carrying the five spec words (ListSpecs, LaunchModel, DownloadModel)."""
        return cls(
            model_name=pb.model_name,
            model_engine=pb.model_engine,
            model_format=pb.model_format,
            size_in_billions=pb.size_in_billions,
            quantization=pb.quantization,
        )


@dataclass(frozen=True)
class Selection:
    """One family, spec, quantization and engine: what a launch runs."""

    family: ModelFamily
    spec: ModelSpec
    quantization: str
    engine: str


@dataclass
class Registry:
    families: dict[str, ModelFamily] = field(default_factory=dict)

    @classmethod
    def load(cls, extra_dirs: Iterable[Path] = ()) -> Registry:
        registry = cls()
        for folder in (BUILTIN_FAMILIES, *extra_dirs):
            for path in Path(folder).glob("*.json"):
                family = ModelFamily.from_json(json.loads(path.read_text()))
                registry.families[family.model_name] = family
        # Listed by name (the files' names need not follow the families').
        registry.families = dict(sorted(registry.families.items()))
        return registry

    def family(self, model_name: str) -> ModelFamily:
        family = self.families.get(model_name)
        if family is None:
            raise NotFound(
                f"no model family named {model_name!r}; known families: {', '.join(self.families)}",
                reason=Reason.MODEL_FAMILY_NOT_FOUND,
            )
        return family

    def search(self, query: SpecQuery) -> list[tuple[ModelFamily, list[ModelSpec]]]:
        """Families matching the query, each with only its matching specs."""
        engine = engine_info(query.model_engine).name if query.model_engine else ""
        families = [self.family(query.model_name)] if query.model_name else list(self.families.values())
        found = []
        for family in families:
            specs = [
                spec
                for spec in family.specs
                if (not query.model_format or spec.model_format == query.model_format)
                and (not query.size_in_billions or spec.size_in_billions == query.size_in_billions)
                and (not query.quantization or _has_quantization(spec, query.quantization))
                and (not engine or engine in spec.engines)
            ]
            if specs:
                found.append((family, specs))
        return found

    def select(self, query: SpecQuery, first_available_engine) -> Selection:
        """The spec a launch means, or an error that names what is valid.

        Empty fields pick the first match, in registry order; an empty engine picks the
        spec's first engine for which first_available_engine(engines) returns a name.
        """
        family = self.family(query.model_name)
        specs = list(family.specs)
        for attribute, wanted in (
            ("model_format", query.model_format),
            ("size_in_billions", query.size_in_billions),
        ):
            if wanted:
                refusal = (
                    f"{query.model_name} has no spec with {attribute} {wanted!r}"
                    f"{_given(query, attribute)}; valid: "
                )
                specs = _narrow(specs, _field(attribute), wanted, refusal, Reason.SPEC_NOT_FOUND)
        if query.quantization:
            refusal = (
                f"{query.model_name}{_given(query, 'quantization')} has no quantization "
                f"{query.quantization!r}; valid: "
            )
            specs = _narrow(
                specs,
                lambda spec: spec.quantizations,
                query.quantization,
                refusal,
                Reason.QUANTIZATION_NOT_SUPPORTED,
                fold=str.lower,
            )
        if query.model_engine:
            engine = engine_info(query.model_engine).name
            refusal = (
                f"engine {engine} does not serve {query.model_name}{_given(query, 'model_engine')}; "
                "engines that do: "
            )
            spec = _narrow(specs, lambda spec: spec.engines, engine, refusal, Reason.ENGINE_NOT_SUPPORTED)[0]
        else:
            spec = specs[0]
            engine = first_available_engine(spec.engines)
        quantization = query.quantization or spec.quantizations[0]
        quantization = next(q for q in spec.quantizations if q.lower() == quantization.lower())
        return Selection(family=family, spec=spec, quantization=quantization, engine=engine)


def _has_quantization(spec: ModelSpec, quantization: str) -> bool:
    return quantization.lower() in (q.lower() for q in spec.quantizations)


def _narrow(
    specs: list[ModelSpec],
    offered: Callable[[ModelSpec], Iterable[str]],
    wanted: str,
    refusal: str,
    reason: Reason,
    fold: Callable[[str], str] = str,
) -> list[ModelSpec]:
    """The specs that offer wanted (compared as fold makes them), or INVALID_ARGUMENT: the refusal,
    then the values the specs offer instead."""
    matching = [spec for spec in specs if fold(wanted) in {fold(value) for value in offered(spec)}]
    if not matching:
        valid = _unique(value for spec in specs for value in offered(spec))
        raise InvalidArgument(refusal + ", ".join(valid), reason=reason)
    return matching


def _field(attribute: str) -> Callable[[ModelSpec], tuple[str]]:
    """A spec's value of one attribute, as the one value it offers."""
    return lambda spec: (getattr(spec, attribute),)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _given(query: SpecQuery, skip: str) -> str:
    """The other words of the query, to say which combination was asked for."""
    words = [
        f"{name} {value}"
        for name, value in (
            ("model_format", query.model_format),
            ("size_in_billions", query.size_in_billions),
            ("quantization", query.quantization),
        )
        if value and name != skip
    ]
    return f" ({', '.join(words)})" if words else ""
