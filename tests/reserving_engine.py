"""A test double of an engine that reserves GPU memory the way vLLM does (never used by the product).

Loaded as a plugin. Its catalogue entry names a memory fraction option, as vLLM's does
(``gpu_memory_utilization``, 0.9 unless set): placement counts that fraction of each GPU's
total memory for every replica, whatever the model. It serves like the Gated double.
"""

from __future__ import annotations

from gated_engine import GatedEngine
from plugin_engine import plugin_family

from llmgrpc.engines.catalogue import EngineInfo, EngineOption

ENGINE_INFO = EngineInfo(
    name="Reserving",
    key="reserving",
    module="reserving_engine",
    extra="reserving",
    required_modules=(),
    formats=("pytorch",),
    options=(
        EngineOption(
            "gpu_memory_utilization",
            float,
            "fraction of each GPU's total memory reserved",
            minimum=0,
            maximum=1,
            exclusive_minimum=True,
        ),
    ),
    memory_fraction_option="gpu_memory_utilization",
    memory_fraction_default=0.9,
)

FAMILY = plugin_family("reserving-model", "reserving")

ENGINE = GatedEngine
