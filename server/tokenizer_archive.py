"""GetTokenizer's answer: a model's tokenizer folder as a zip, streamed in chunks.

Owner: the vLLM engine contract (``llmgrpc.server.engine_api``). The zip holds the
tokenizer files the folder has (``engines.model_facts.TOKENIZER_FILES``) at its root, in a
fixed order with fixed timestamps, so the same folder always gives the same bytes and the
same SHA-256; the last chunk carries that digest (hex) of the whole zip, as the gateway
checks it.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

from smg_grpc_proto.generated import common_pb2

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines.model_facts import TOKENIZER_FILES

CHUNK_BYTES = 1024 * 1024  # well below any gRPC message limit
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest time: the archive does not depend on file times


def zip_folder(folder: Path) -> bytes:
    """The folder's tokenizer files as zip bytes; FAILED_PRECONDITION if it has none."""
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if "tokenizer.json" not in present and "tokenizer.model" not in present:
        raise FailedPrecondition(
            f"the model's tokenizer folder {folder} has no tokenizer.json or tokenizer.model",
            reason=Reason.MODEL_FILES_INVALID,
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in present:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, (folder / name).read_bytes())
    return buffer.getvalue()


def chunks(data: bytes, size: int = CHUNK_BYTES) -> list[common_pb2.GetTokenizerChunk]:
    """data in chunks of at most size bytes; the last one has the SHA-256 of all of data."""
    pieces = [data[start : start + size] for start in range(0, len(data), size)] or [b""]
    answer = [common_pb2.GetTokenizerChunk(data=piece) for piece in pieces]
    answer[-1].sha256 = hashlib.sha256(data).hexdigest()
    return answer
