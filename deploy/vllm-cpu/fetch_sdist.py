"""Download one project's source distribution from the package index pip is configured with.

`pip download --no-binary` cannot fetch vLLM's sdist for a CPU build: pip prepares its
metadata, vLLM's setup.py names the version `X.Y.Z+cpu`, and pip discards the file as
inconsistent with the requested `X.Y.Z`. This asks the index (PEP 691 JSON) for the file,
checks its sha256 against the index, and writes it, without building anything.

    python fetch_sdist.py vllm 0.32.0 DEST_DIR
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from pip._internal.models.index import PyPI

JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"


def configured_index_url() -> str:
    """pip's `global.index-url` (or PIP_INDEX_URL) if set, else pip's default index."""
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
        capture_output=True,
        text=True,
    )
    configured = completed.stdout.strip()
    return configured if completed.returncode == 0 and configured else PyPI.simple_url


def sdist_entry(index_url: str, project: str, version: str) -> dict:
    request = urllib.request.Request(f"{index_url.rstrip('/')}/{project}/", headers={"Accept": JSON_ACCEPT})
    with urllib.request.urlopen(request, timeout=60) as response:
        listing = json.load(response)
    wanted = f"{project}-{version}.tar.gz"
    for entry in listing["files"]:
        if entry["filename"] == wanted:
            return entry
    raise SystemExit(f"{wanted} is not on {index_url}")


def main() -> None:
    project, version, dest = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    entry = sdist_entry(configured_index_url(), project, version)
    target = dest / entry["filename"]
    expected = entry["hashes"]["sha256"]
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
        print(f"{target} already downloaded")
        return
    dest.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(entry["url"], timeout=600) as response:
        payload = response.read()
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise SystemExit(f"{entry['filename']}: sha256 {actual} does not match the index's {expected}")
    target.write_bytes(payload)
    print(f"{target}: {len(payload) / 2**20:.1f} MiB, sha256 verified")


if __name__ == "__main__":
    main()
