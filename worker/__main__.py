"""``python -m llmgrpc.worker``: the worker process's entry point (see ``service.main``)."""

from llmgrpc.worker.service import main

main()
