"""The registry holds exactly what the seed document gives for llama-3.1."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmgrpc.clients.errors import InvalidArgument, NotFound
from llmgrpc.server.registry import Registry, SpecQuery

SEED = Path(__file__).parent / "data" / "llama-3.1.rst"


def parse_seed(text: str) -> dict:
    """The family and its specs as the seed's reStructuredText writes them."""

    def bullet(block: str, name: str) -> str:
        return re.search(rf"- \*\*{re.escape(name)}:?\*\*:?\s*(.*)", block).group(1).strip()

    head, *spec_blocks = re.split(r"\nModel Spec \d+ ", text)
    family = {
        "context_length": int(bullet(head, "Context Length")),
        "model_name": bullet(head, "Model Name"),
        "languages": [lang.strip() for lang in bullet(head, "Languages").split(",")],
        "abilities": [a.strip() for a in bullet(head, "Abilities").split(",")],
        "description": bullet(head, "Description"),
        "specs": [],
    }
    for block in spec_blocks:
        hubs = re.findall(r"`([^<`]+?) <([^>]+)>`__", bullet(block, "Model Hubs"))
        family["specs"].append(
            {
                "model_format": bullet(block, "Model Format"),
                "size_in_billions": bullet(block, "Model Size (in billions)"),
                "quantizations": [q.strip() for q in bullet(block, "Quantizations").split(",")],
                "engines": [e.strip() for e in bullet(block, "Engines").split(",")],
                "model_id": bullet(block, "Model ID"),
                "hubs": [(name.strip(), url) for name, url in hubs],
            }
        )
    return family


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load()


def test_llama_3_1_matches_the_seed_field_for_field(registry: Registry):
    seed = parse_seed(SEED.read_text())
    family = registry.family("llama-3.1")
    assert family.model_name == seed["model_name"]
    assert family.context_length == seed["context_length"] == 131072
    assert list(family.languages) == seed["languages"]
    assert list(family.abilities) == seed["abilities"]
    assert family.description == seed["description"]
    assert len(family.specs) == len(seed["specs"]) == 4
    for spec, expected in zip(family.specs, seed["specs"], strict=True):
        assert spec.model_format == expected["model_format"]
        assert spec.size_in_billions == expected["size_in_billions"]
        assert list(spec.quantizations) == expected["quantizations"]
        assert list(spec.engines) == expected["engines"]
        assert spec.model_id == expected["model_id"]
        assert [(hub.display_name, hub.url) for hub in spec.hubs] == expected["hubs"]
        # Each hub's id is the last part of its URL's path.
        for hub in spec.hubs:
            assert hub.url.endswith("/" + hub.model_id)
    gguf = family.specs[1]
    assert len(gguf.quantizations) == 14
    assert gguf.model_file_name_template.format(quantization="Q4_K_M") == "Meta-Llama-3.1-8B.Q4_K_M.gguf"


def test_tiny_family_is_shipped_and_says_its_text_is_meaningless(registry: Registry):
    tiny = registry.family("tiny-llama-3.1")
    assert "meaningless" in tiny.description
    assert tiny.specs[0].model_format == "pytorch"
    assert "Transformers" in tiny.specs[0].engines


def test_search_filters_by_every_field(registry: Registry):
    found = registry.search(SpecQuery(model_name="llama-3.1", model_format="ggufv2", quantization="q4_k_m"))
    assert [(f.model_name, [s.model_format for s in specs]) for f, specs in found] == [
        ("llama-3.1", ["ggufv2"])
    ]
    found = registry.search(SpecQuery(model_engine="LLAMA.CPP"))
    assert [f.model_name for f, _ in found] == [
        "llama-3.1",
        "llama-3.1-instruct",
        "tiny-llama-3.1",
        "tiny-llama-3.1-instruct",
    ]
    found = registry.search(SpecQuery(model_name="llama-3.1", size_in_billions="70"))
    assert [[s.size_in_billions for s in specs] for _, specs in found] == [["70"]]


def test_select_names_the_valid_choices(registry: Registry):
    def first(engines):
        return engines[0]

    with pytest.raises(InvalidArgument, match="valid: 8, 70, 405"):
        registry.select(SpecQuery(model_name="llama-3.1", size_in_billions="13"), first)
    with pytest.raises(InvalidArgument, match="valid: Q2_K, Q3_K_L"):
        registry.select(SpecQuery(model_name="llama-3.1", model_format="ggufv2", quantization="Q9"), first)
    with pytest.raises(InvalidArgument, match="engines that do: vLLM, Transformers, SGLang"):
        registry.select(
            SpecQuery(model_name="llama-3.1", model_format="pytorch", model_engine="llama.cpp"), first
        )
    with pytest.raises(NotFound, match="known families"):
        registry.select(SpecQuery(model_name="llama-9"), first)
    selection = registry.select(
        SpecQuery(model_name="llama-3.1", model_format="ggufv2", quantization="q8_0"), first
    )
    assert (selection.spec.size_in_billions, selection.quantization, selection.engine) == (
        "8",
        "Q8_0",
        "llama.cpp",
    )


# llama-3.1-instruct as Xinference registers it (its family JSON, version 2), in this registry's
# shape. Left out: the mlx, gptq and awq specs (no engine here for them), the unsloth bnb-4bit
# pytorch repositories (bitsandbytes 4-bit weights published under the same format, size and
# quantization as the full-precision ones) and the openmind_hub source (a hub llmgrpc has no
# client for).
INSTRUCT_PYTORCH = {
    size: (f"meta-llama/Meta-Llama-3.1-{size}B-Instruct", f"LLM-Research/Meta-Llama-3.1-{size}B-Instruct")
    for size in ("8", "70", "405")
}
INSTRUCT_GGUF = {
    "8": (
        ["Q3_K_L", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"],
        "lmstudio-community/Meta-Llama-3.1-8B-Instruct-GGUF",
        ["huggingface", "modelscope"],
    ),
    "70": (
        ["IQ2_M", "IQ4_XS", "Q2_K", "Q3_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"],
        "lmstudio-community/Meta-Llama-3.1-70B-Instruct-GGUF",
        ["huggingface"],
    ),
}


def test_llama_3_1_instruct_is_registered_as_xinference_registers_it(registry: Registry):
    family = registry.family("llama-3.1-instruct")
    assert family.context_length == 131072
    assert list(family.languages) == ["en", "de", "fr", "it", "pt", "hi", "es", "th"]
    assert list(family.abilities) == ["chat", "tools"]
    assert family.description.startswith("The Llama 3.1 instruction tuned models are optimized for dialogue")
    pytorch = [spec for spec in family.specs if spec.model_format == "pytorch"]
    assert [spec.size_in_billions for spec in pytorch] == ["8", "70", "405"]
    for spec in pytorch:
        huggingface_id, modelscope_id = INSTRUCT_PYTORCH[spec.size_in_billions]
        assert (spec.model_id, spec.quantizations) == (huggingface_id, ("none",))
        assert spec.engines == ("vLLM", "Transformers", "SGLang")
        assert [(hub.name, hub.model_id) for hub in spec.hubs] == [
            ("huggingface", huggingface_id),
            ("modelscope", modelscope_id),
        ]
        assert spec.hubs[0].url == f"https://huggingface.co/{huggingface_id}"
    gguf = [spec for spec in family.specs if spec.model_format == "ggufv2"]
    assert [spec.size_in_billions for spec in gguf] == ["8", "70"]
    for spec in gguf:
        quantizations, model_id, hub_names = INSTRUCT_GGUF[spec.size_in_billions]
        assert list(spec.quantizations) == quantizations
        assert (spec.model_id, spec.engines) == (model_id, ("llama.cpp",))
        assert [hub.name for hub in spec.hubs] == hub_names
        size = spec.size_in_billions
        assert spec.model_file_name_template == f"Meta-Llama-3.1-{size}B-Instruct-{{quantization}}.gguf"
    # The 70B's largest quantizations come in two parts.
    split = gguf[1]
    assert split.file_names("Q8_0") == [
        "Meta-Llama-3.1-70B-Instruct-Q8_0-00001-of-00002.gguf",
        "Meta-Llama-3.1-70B-Instruct-Q8_0-00002-of-00002.gguf",
    ]
    assert split.file_names("Q4_K_M") == ["Meta-Llama-3.1-70B-Instruct-Q4_K_M.gguf"]
    assert {spec.model_format for spec in family.specs} == {"pytorch", "ggufv2"}


def test_the_tiny_instruct_model_is_registered_for_chat_and_tools(registry: Registry):
    family = registry.family("tiny-llama-3.1-instruct")
    assert list(family.abilities) == ["chat", "tools"]
    base = registry.family("tiny-llama-3.1")
    for spec, base_spec in zip(family.specs, base.specs, strict=True):
        assert spec.generator == "tiny-llama-3.1-instruct"
        assert (spec.model_format, spec.quantizations) == (base_spec.model_format, base_spec.quantizations)
