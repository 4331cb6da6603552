"""Weight acquisition: where a model's files come from before an engine loads them.

``resolve(plan, report)`` turns a launch plan into files on disk: a local folder
(``model_path``), a model this project generates itself (``tiny_model``, converted to GGUF
by ``gguf_convert``), or a hub download (``hubs`` says which hubs exist and what they need,
``downloads`` fetches with progress and disk checks). Workers call it; the server only
reads ``hubs`` to refuse, before any worker starts, a download that cannot happen.
"""

from llmgrpc.engines.weights.resolution import resolve

__all__ = ["resolve"]
