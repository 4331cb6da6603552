"""Aggregate decode throughput of llmgrpc's llama.cpp engine against llama-cpp-python's own server.

Builds a ~100M-parameter Llama model with random weights (hidden 768, 12 layers, 12
heads, 4 KV heads, intermediate 3072, the tiny model's tokenizer), converts it to GGUF
Q4_K_M with llmgrpc's converter, then runs 1, 4, 8 and 16 concurrent greedy streams of
128 tokens each (end-of-text suppressed) against:

- llmgrpc (``llmgrpc serve`` in a subprocess; the llama.cpp engine batches the streams),
- ``python -m llama_cpp.server`` on the same file and threads, with its default
  ``--interrupt_requests True`` (a waiting request cuts the running stream short) and with
  ``--interrupt_requests False`` (requests wait their turn).

Aggregate tokens/s is tokens received by all streams over the wall time from the first
request to the last stream's end. llama_cpp.server streams about one event per token;
a stream it interrupted counts its events as its tokens.

Needs the transformers extra (to build the model) and, for llama_cpp.server, the packages
of llama-cpp-python's [server] extra: sse-starlette starlette-context pydantic-settings
fastapi uvicorn.

Usage: python benchmarks/llamacpp_concurrency.py [--work-dir DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llmgrpc.clients import Client
from llmgrpc.engines import gguf_convert, tiny_model
from llmgrpc.v1 import generate_pb2

MODEL_NAME = "bench-llama-100m"
QUANTIZATION = "Q4_K_M"
CONCURRENCY = (1, 4, 8, 16)
MAX_TOKENS = 128
ARCHITECTURE = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
}
# Each llmgrpc sequence slot gets 512 tokens of KV cache: room for a prompt and 128 tokens.
CONTEXT_PER_SEQUENCE = 512


def build_model(work_dir: Path) -> Path:
    """The Q4_K_M GGUF of the benchmark model, built once in work_dir."""
    gguf_dir = work_dir / "gguf"
    target = gguf_dir / f"{MODEL_NAME}.{QUANTIZATION}.gguf"
    if target.exists():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tiny = tiny_model.ensure(work_dir / "tiny-hf")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    hf_dir = work_dir / "hf"
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")],
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters=dict(tiny_model.ROPE),
        **ARCHITECTURE,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    print(f"built {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    gguf_dir.mkdir(parents=True, exist_ok=True)
    unquantized = gguf_convert.convert_llama(hf_dir, gguf_dir / f"{MODEL_NAME}.F32.gguf", name=MODEL_NAME)
    gguf_convert.quantize(unquantized, target, QUANTIZATION)
    unquantized.unlink()
    shutil.rmtree(hf_dir)
    return target


def write_family(work_dir: Path) -> Path:
    """A registry family for the benchmark model, for ``llmgrpc serve --families-dir``."""
    folder = work_dir / "families"
    folder.mkdir(parents=True, exist_ok=True)
    family = {
        "version": 1,
        "model_name": MODEL_NAME,
        "model_description": "A ~100M-parameter Llama with random weights, for benchmarks.",
        "context_length": ARCHITECTURE["max_position_embeddings"],
        "model_lang": ["en"],
        "model_ability": ["generate"],
        "model_specs": [
            {
                "model_format": "ggufv2",
                "model_size_in_billions": "0_1",
                "quantizations": [QUANTIZATION],
                "model_engines": ["llama.cpp"],
                "model_id": f"local/{MODEL_NAME}",
                "model_file_name_template": f"{MODEL_NAME}.{{quantization}}.gguf",
                "model_hubs": [],
            }
        ],
    }
    (folder / f"{MODEL_NAME}.json").write_text(json.dumps(family, indent=2))
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prompts(count: int) -> list[str]:
    return [f"Stream {i}: the quick brown fox jumps over the lazy dog" for i in range(count)]


def measure(run_stream, count: int) -> tuple[float, int, int]:
    """(aggregate tokens/s, tokens, streams that ran to max_tokens) for count concurrent streams.

    run_stream(prompt) returns (tokens received, whether the stream ended at max_tokens).
    """
    start = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        streams = list(pool.map(run_stream, prompts(count)))
    elapsed = time.perf_counter() - start
    tokens = sum(received for received, _ in streams)
    return tokens / elapsed, tokens, sum(complete for _, complete in streams)


class Subprocess:
    """A server process, its output in a log file, stopped with SIGINT then SIGKILL."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "w")  # closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log_path.read_text(errors="replace"))
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.log_path.name}: no {pattern!r} in time; log:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def bench_llmgrpc(work_dir: Path, model_file: Path, threads: int) -> dict[int, tuple[float, int, int]]:
    port = free_port()
    server = Subprocess(
        [
            str(Path(sys.executable).with_name("llmgrpc")),
            "serve",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--cache-dir",
            str(work_dir / "cache"),
            "--families-dir",
            str(write_family(work_dir)),
            "--max-running-requests",
            str(max(CONCURRENCY)),
            "--device",
            "cpu",
            "--allowed-model-dirs",
            str(model_file.parent),
        ],
        work_dir / "llmgrpc.log",
    )
    results = {}
    try:
        endpoint = server.wait_for(r"llmgrpc listening on (\S+)", 60).group(1)
        with Client(endpoint) as client:
            model = client.launch(
                MODEL_NAME,
                model_path=str(model_file.parent),  # the folder: the template picks the file
                engine_options={
                    "n_threads": threads,
                    "context_length": CONTEXT_PER_SEQUENCE * max(CONCURRENCY),
                },
                timeout=300,
            )

            def run_stream(prompt: str) -> tuple[int, bool]:
                sampling = dict(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
                responses = list(client.generate(model.model_uid, prompt, **sampling))
                tokens = sum(len(response.token_ids) for response in responses)
                return tokens, responses[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH

            run_stream("warm up")
            for count in CONCURRENCY:
                results[count] = measure(run_stream, count)
                print(f"llmgrpc, {count} streams: {results[count]}", flush=True)
            print(f"llmgrpc peak batch size: {client.get_model(model.model_uid).peak_batch_size}", flush=True)
    finally:
        server.stop()
    return results


def bench_llama_cpp_server(
    work_dir: Path, model_file: Path, threads: int, interrupt: bool
) -> dict[int, tuple[float, int, int]]:
    port = free_port()
    server = Subprocess(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_file),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--interrupt_requests",
            str(interrupt),
        ],
        work_dir / f"llama_cpp_server.interrupt-{interrupt}.log",
    )
    # End-of-text ids pushed down, as llmgrpc's ignore_eos does, so every stream can reach 128 tokens.
    eos_bias = {"1": -100.0, "4": -100.0}
    results = {}
    try:
        server.wait_for(r"Uvicorn running on", 120)

        def run_stream(prompt: str) -> tuple[int, bool]:
            body = json.dumps(
                {
                    "prompt": prompt,
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "stream": True,
                    "logit_bias": eos_bias,
                }
            )
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            events, finish = 0, None
            for line in response:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                finish = json.loads(line[6:])["choices"][0].get("finish_reason")
                events += finish is None
            connection.close()
            # A stream that ends with "length" made max_tokens tokens. An interrupted one sent an
            # event per token, give or take one for text it held back at a token boundary.
            return (MAX_TOKENS, True) if finish == "length" else (events, False)

        run_stream("warm up")
        for count in CONCURRENCY:
            results[count] = measure(run_stream, count)
            print(f"llama_cpp.server interrupt={interrupt}, {count} streams: {results[count]}", flush=True)
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-dir", type=Path, help="for the model and logs (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per server")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="llmgrpc-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work_dir}", flush=True)
    model_file = build_model(work_dir)
    print(f"model: {model_file} ({model_file.stat().st_size / 2**20:.0f} MiB)", flush=True)

    columns = {
        "llmgrpc (llama.cpp engine)": bench_llmgrpc(work_dir, model_file, args.threads),
        "llama_cpp.server": bench_llama_cpp_server(work_dir, model_file, args.threads, interrupt=True),
        "llama_cpp.server --interrupt_requests False": bench_llama_cpp_server(
            work_dir, model_file, args.threads, interrupt=False
        ),
    }
    print()
    print(f"{MODEL_NAME} {QUANTIZATION}, {args.threads} threads, {MAX_TOKENS} greedy tokens per stream.")
    print("Aggregate generated tokens/s (streams that ran to max_tokens / streams).")
    print()
    print("| concurrent streams | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for count in CONCURRENCY:
        cells = [f"{r[count][0]:.1f} ({r[count][2]}/{count})" for r in columns.values()]
        print(f"| {count} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
