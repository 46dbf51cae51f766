"""Rollout throughput on this machine: the embedded engine vs `model.generate`, and the HTTP client.

    python benchmarks/rollout.py            # all measurements, printed as a table
    python benchmarks/rollout.py --quick    # fewer repetitions

1. Embedded engine tokens/s on the tiny CPU model (Llama, hidden 64, 2 layers, vocab 300)
   at batch 1 and 64, against plain ``model.generate`` (multinomial sampling, same
   lengths) in the same run. Both generate exactly ``--new-tokens`` tokens per row
   (EOS ignored), so tokens/s compare like for like; the engine also returns the
   log-prob of every sampled token, which ``generate`` does not.
2. Client requests/s: the SGLang client (:class:`inference.sglang_engine.SGLangEngine`)
   sending short ``/generate`` requests to a fake endpoint that answers a canned
   completion (a subprocess; this measures the client, not a model), plus the client's
   own CPU time per request, which bounds what it could sustain against faster servers.
   The same client against the real stand-in server (``inference.serve``, 1 new token)
   shows the end-to-end server-bound rate.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inference.embedded import EmbeddedEngine  # noqa: E402
from inference.engine import SamplingParams  # noqa: E402


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and fill caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_embedded(model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """-> (engine tokens/s, model.generate tokens/s), generated tokens only."""
    prompts = torch.randint(3, 300, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).tolist()
    engine = EmbeddedEngine(model, max_batch_size=max(batch, 1))
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    t_engine = best_of(lambda: engine.generate(prompts, 1, sp), repeats)

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def hf_generate():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        assert out.shape[1] == prompt_len + new_tokens

    t_hf = best_of(hf_generate, repeats)
    tokens = batch * new_tokens
    return tokens / t_engine, tokens / t_hf


# ---------------------------------------------------------------------- HTTP client


def fake_server(port: int) -> None:
    """A /generate endpoint as cheap as aiohttp allows: one canned 4-token completion."""
    from aiohttp import web

    body = json.dumps({
        "text": "", "output_ids": [5, 6, 7, 8],
        "meta_info": {"id": "x", "prompt_tokens": 3, "completion_tokens": 4, "weight_version": "0",
                      "finish_reason": {"type": "length", "length": 4},
                      "output_token_logprobs": [[-0.5, t, None] for t in (5, 6, 7, 8)]},
    }).encode()

    async def generate(request):
        await request.read()
        return web.Response(body=body, content_type="application/json")

    async def health(request):
        return web.Response()

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    from inference.launcher import http_ok

    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not http_ok(f"http://127.0.0.1:{port}/health"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    return proc


def bench_client(url: str, requests: int, new_tokens: int, concurrency: int) -> tuple[float, float]:
    """-> (requests/s wall, client CPU microseconds per request)."""
    from inference.sglang_client import ClientConfig
    from inference.sglang_engine import SGLangEngine

    with SGLangEngine.connect([url], client=ClientConfig(max_concurrency=concurrency, request_timeout_s=120)) as engine:
        sp = SamplingParams(max_new_tokens=new_tokens, seed=0)
        engine.generate([[1, 2, 3]] * 64, 1, sp)  # warm-up: connections open
        cpu0 = _thread_cpu(engine)
        start = time.perf_counter()
        groups = engine.generate([[1, 2, 3]] * (requests // 8), 8, sp)
        wall = time.perf_counter() - start
        cpu = _thread_cpu(engine) - cpu0
    assert sum(len(g) for g in groups) == requests // 8 * 8
    return requests / wall, cpu / requests * 1e6


def _thread_cpu(engine) -> float:
    """CPU seconds used so far by the engine's event-loop thread (where the client runs)."""
    tid = engine._loop.thread.native_id
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--fake-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_server:
        fake_server(args.fake_server)
        return
    repeats = 1 if args.quick else 3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    model = tiny_model()
    print(f"\nembedded engine vs model.generate: tiny Llama, prompt 16, {args.new_tokens} new tokens per row")
    print(f"{'batch':>6} {'engine tok/s':>14} {'generate tok/s':>15} {'ratio':>7}")
    for batch in (1, 64):
        ours, hf = bench_embedded(model, batch, 16, args.new_tokens, repeats)
        print(f"{batch:>6} {ours:>14.0f} {hf:>15.0f} {ours / hf:>7.2f}")

    logs = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    requests = args.requests // (4 if args.quick else 1)
    print(f"\nSGLang client, {requests} /generate requests, concurrency 256")
    port = free_port()
    fake = start([sys.executable, str(Path(__file__).resolve()), "--fake-server", str(port)], port, logs / "fake.log")
    try:
        rate, cpu_us = bench_client(f"http://127.0.0.1:{port}", requests, 4, 256)
        print(f"  fake endpoint (canned answer):   {rate:8.0f} requests/s, client CPU {cpu_us:5.0f} us/request "
              f"(-> {1e6 / cpu_us:.0f} requests/s per client core)")
    finally:
        fake.terminate()
        fake.wait()

    with tempfile.TemporaryDirectory() as tmp:
        tiny_model().save_pretrained(tmp)
        port = free_port()
        server = start([sys.executable, "-m", "inference.serve", "--model", tmp, "--port", str(port),
                        "--num-threads", "1", "--log-level", "warning"], port, logs / "serve.log")
        try:
            rate, cpu_us = bench_client(f"http://127.0.0.1:{port}", requests // 4, 1, 256)
            print(f"  stand-in server (tiny model, 1 new token): {rate:8.0f} requests/s, client CPU {cpu_us:5.0f} us/request")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
