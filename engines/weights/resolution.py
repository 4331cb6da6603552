"""Where a model's weights come from: a local path, the built-in generator, or a hub.

Runs in the worker process, before the engine loads: the server itself never touches
weight files. Hub downloads (``llmgrpc.engines.weights.downloads``) go through the hubs' own
client libraries, into their own caches, so weights a user already downloaded are found
and reused.
"""

from __future__ import annotations

from pathlib import Path

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines.base import LoadPlan, ProgressReport
from llmgrpc.engines.weights import downloads, tiny_model


def resolve(plan: LoadPlan, report: ProgressReport) -> str:
    """A local path holding the plan's weights, generating or downloading them first if needed."""
    spec = plan.spec
    if plan.model_path:
        path = Path(plan.model_path).expanduser()
        if not path.exists():
            raise FailedPrecondition(
                f"model_path {plan.model_path!r} does not exist on the server", reason=Reason.WEIGHTS_MISSING
            )
        if path.is_dir() and spec.model_format.startswith("gguf"):
            file_name = (
                spec.file_names or [spec.model_file_name_template.format(quantization=spec.quantization)]
            )[0]
            return str(gguf_file_in(path, file_name))
        return str(path)
    if spec.generator in tiny_model.VARIANTS:
        name = spec.generator
        if spec.model_format.startswith("gguf"):
            # Imported here: gguf and llama_cpp are only in the llama.cpp engine's environment.
            from llmgrpc.engines.weights import gguf_convert

            report("generating", 0, 0)
            path = gguf_convert.ensure_tiny_gguf(
                Path(plan.cache_dir), spec.quantization, spec.model_file_name_template, name=name
            )
            return str(path)
        target = Path(plan.cache_dir) / name / spec.model_format
        if spec.model_format != "pytorch":
            raise FailedPrecondition(f"{name} has no {spec.model_format} weights to generate")
        report("generating", 0, 0)
        return str(tiny_model.ensure(target, name))
    return downloads.download(plan, report)


def gguf_file_in(folder: Path, file_name: str) -> Path:
    """The GGUF file the spec's template names for the plan's quantization, inside folder."""
    if not file_name:
        raise FailedPrecondition(
            f"model_path {str(folder)!r} is a folder and the spec names no GGUF file: give the file itself"
        )
    path = folder / file_name
    if not path.is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))
        raise FailedPrecondition(
            f"model_path {str(folder)!r} is a folder without {file_name}; GGUF files there: "
            f"{', '.join(present) or 'none'}; give the file itself as model_path, or pick its quantization",
            reason=Reason.WEIGHTS_MISSING,
        )
    return path
