"""The table of launched models by uid, and the background tasks that act on them (owned here,
so that no task is lost and shutdown can wait for them all)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from llmgrpc.clients.errors import AlreadyExists, NotFound, Reason
from llmgrpc.server.launched import HealthUpdate, LaunchedModel, ModelState, health_name


class ModelTable:
    def __init__(self, health: HealthUpdate):
        self.health = health  # sets a health service's status (model/<uid> per model)
        self._models: dict[str, LaunchedModel] = {}
        self._background: set[asyncio.Task] = set()

    def list(self) -> list[LaunchedModel]:
        return list(self._models.values())

    def get(self, model_uid: str) -> LaunchedModel:
        model = self._models.get(model_uid)
        if model is None:
            known = ", ".join(self._models) or "none"
            raise NotFound(
                f"no launched model has uid {model_uid!r}; launched models: {known}",
                reason=Reason.MODEL_NOT_FOUND,
                metadata={"model_uid": model_uid},
            )
        return model

    def add(self, model: LaunchedModel) -> None:
        """List a new model (NOT_SERVING until READY); its uid must be free."""
        if model.uid in self._models:
            raise _uid_taken(self._models[model.uid])
        self._models[model.uid] = model
        self.health(health_name(model.uid), False)

    def check_free(self, model_uid: str) -> None:
        if model_uid in self._models:
            raise _uid_taken(self._models[model_uid])

    def forget(self, model: LaunchedModel) -> None:
        """Unlist model; never another model launched since under the same uid."""
        if self._models.get(model.uid) is model:
            del self._models[model.uid]
            self.health(health_name(model.uid), False)

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """A task the table owns: kept referenced until done, its failure retrieved (callers that
        wait on it see the failure themselves)."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)

        def done(task: asyncio.Task) -> None:
            self._background.discard(task)
            if not task.cancelled():
                task.exception()

        task.add_done_callback(done)
        return task

    async def wait_background(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)


def _uid_taken(model: LaunchedModel) -> AlreadyExists:
    if model.state is ModelState.TERMINATING:
        return AlreadyExists(
            f"model {model.uid} is being terminated; launch it again once TerminateModel returns",
            reason=Reason.MODEL_UID_TAKEN,
            metadata={"model_uid": model.uid},
        )
    return AlreadyExists(
        f"a model with uid {model.uid!r} is already launched ({model.state.name}); terminate it first",
        reason=Reason.MODEL_UID_TAKEN,
        metadata={"model_uid": model.uid},
    )
