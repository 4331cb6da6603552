"""llama.cpp's own C++ server, as xllamacpp packages it, on one GGUF file (the benchmark's peer).

Starts ``xllamacpp.Server`` with ``parallel`` slots (continuous batching over them), prints
``listening on URL`` and serves its OpenAI-compatible HTTP API until standard input closes.

    python benchmarks/xllamacpp_server.py MODEL.gguf --threads 2 --parallel 32 --context-per-slot 512
"""

from __future__ import annotations

import argparse
import sys

import xllamacpp


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--parallel", type=int, required=True, help="slots decoded together")
    parser.add_argument("--context-per-slot", type=int, default=512)
    args = parser.parse_args()
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.n_parallel = args.parallel
    params.n_ctx = args.context_per_slot * args.parallel
    params.cont_batching = True
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = args.threads
    server = xllamacpp.Server(params)
    print(f"listening on {server.listening_address}", flush=True)
    sys.stdin.read()  # until the benchmark closes it (or exits)
    del server


if __name__ == "__main__":
    main()
