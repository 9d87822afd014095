"""`edge-embed serve` under a flood and under pool thrash: memory, small-call latency, outcomes.

Flood: one server process (`--memory-budget`, default 1GiB) and a client process sending
64 concurrent Embed calls of 240 texts x 30,000 characters (60 s deadlines) while five
one-text calls (3 s deadlines) arrive during the flood. Reports the server's peak RSS
(VmHWM, the kernel's high-water mark over the whole run), each small call's latency, and
how the big calls ended and how fast.

Thrash: `--bundle a=B@int8 --bundle b=B@fp32 --memory-budget 1GiB` (one fits, not both),
3 rounds of 5 + 5 concurrent calls with 60 s deadlines; reports answers and model loads.

Prints tables and writes JSON (bench/results/serve_flood.json by default).

    python bench/serve_flood.py [--bundle PATH] [--budget 1GiB] [--skip-thrash] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import REPO, free_port, is_serving, print_table, stop_process  # noqa: E402

BIG_CALLS, BIG_TEXTS, BIG_CHARS, BIG_DEADLINE_S = 64, 240, 30_000, 60.0
SMALL_CALLS, SMALL_DEADLINE_S, SMALL_EVERY_S = 5, 3.0, 0.5
THRASH_ROUNDS, THRASH_CALLS = 3, 5


def start_server(args: list[str], start_timeout_s: float = 240.0):
    import subprocess
    import tempfile

    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "edge_embed.cli", "serve", "--host", "127.0.0.1", "--port",
                             str(port), "--threads", "2", *args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + start_timeout_s
    while not is_serving(target):
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            stop_process(proc)
            raise RuntimeError(f"server never reported SERVING:\n{log.read().decode(errors='replace')[-3000:]}")
        time.sleep(0.3)
    return proc, target, log


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def call(stub, request, timeout: float) -> tuple[str, float]:
    import grpc

    started = time.monotonic()
    try:
        await stub(request, timeout=timeout)
        status = "OK"
    except grpc.aio.AioRpcError as exc:
        status = exc.code().name
    return status, time.monotonic() - started


async def flood(target: str) -> dict:
    import grpc

    from edge_embed.v1 import embed_pb2 as pb

    options = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        embed = channel.unary_unary("/edge_embed.v1.EmbeddingService/Embed", pb.EmbedRequest.SerializeToString,
                                    pb.EmbedResponse.FromString)
        word_texts = [(f"w{k} " * (BIG_CHARS // 4))[:BIG_CHARS] for k in range(BIG_TEXTS)]
        big_requests = [pb.EmbedRequest(inputs=word_texts) for _ in range(BIG_CALLS)]

        async def smalls() -> list[tuple[str, float]]:
            await asyncio.sleep(1.0)
            out = []
            for i in range(SMALL_CALLS):
                out.append(await call(embed, pb.EmbedRequest(inputs=[f"a small query number {i}"]), SMALL_DEADLINE_S))
                await asyncio.sleep(SMALL_EVERY_S)
            return out

        started = time.monotonic()
        small_task = asyncio.create_task(smalls())
        big = await asyncio.gather(*(call(embed, r, BIG_DEADLINE_S) for r in big_requests))
        small = await small_task
        wall = time.monotonic() - started
    codes = Counter(status for status, _ in big)
    by_code = {code: round(max(s for c, s in big if c == code), 2) for code in codes}
    return {
        "big_outcomes": dict(codes),
        "big_slowest_answer_s_by_code": by_code,
        "small_outcomes": [status for status, _ in small],
        "small_latency_ms": [round(s * 1000, 1) for _, s in small],
        "wall_s": round(wall, 1),
    }


def run_flood(bundle: Path, budget: str) -> dict:
    proc, target, log = start_server(["--bundle", f"{bundle}@int8", "--memory-budget", budget])
    try:
        rss_serving = status_kb(proc.pid, "VmRSS") * 1024
        result = asyncio.run(flood(target))
        result["peak_rss_bytes"] = status_kb(proc.pid, "VmHWM") * 1024
        result["rss_serving_bytes"] = rss_serving
        result["still_serving"] = is_serving(target)
    finally:
        stop_process(proc)
        log.close()
    result["budget"] = budget
    return result


async def thrash(target: str) -> dict:
    from edge_embed.client import AsyncEmbedClient

    outcomes = Counter()
    async with AsyncEmbedClient(target, timeout=60.0, retries=0) as client:
        async def one(model: str, i: int) -> None:
            try:
                await client.embed([f"thrash text {i} for model {model}"] * 4, model=model)
                outcomes["OK"] += 1
            except Exception as exc:  # noqa: BLE001 - counted by kind
                outcomes[str(exc).split(":")[0]] += 1

        for round_ in range(THRASH_ROUNDS):
            await asyncio.gather(*(one(m, round_ * 10 + i) for m in ("a", "b") for i in range(THRASH_CALLS)))
        info = await client.info()
    return {"outcomes": dict(outcomes), "loads": {m.name: m.loads for m in info.models},
            "evictions": {m.name: m.evictions for m in info.models}}


def run_thrash(bundle: Path, budget: str) -> dict:
    proc, target, log = start_server(["--bundle", f"a={bundle}@int8", "--bundle", f"b={bundle}@fp32",
                                      "--memory-budget", budget])
    try:
        result = asyncio.run(thrash(target))
        result["peak_rss_bytes"] = status_kb(proc.pid, "VmHWM") * 1024
    finally:
        stop_process(proc)
        log.close()
    result["budget"] = budget
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle with int8 and fp32 variants (default: the default model)")
    parser.add_argument("--budget", default="1GiB", help="the flood server's --memory-budget")
    parser.add_argument("--thrash-budget", default="1GiB", help="the thrash server's --memory-budget")
    parser.add_argument("--skip-thrash", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_flood.json")
    args = parser.parse_args()
    from edge_embed.default_model import ensure_default_bundle

    bundle = args.bundle or ensure_default_bundle()
    results: dict = {"machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version()}}
    results["flood"] = run_flood(bundle, args.budget)
    f = results["flood"]
    print(f"flood: {BIG_CALLS} x Embed({BIG_TEXTS} texts x {BIG_CHARS:,} chars, {BIG_DEADLINE_S:g} s) + "
          f"{SMALL_CALLS} one-text calls ({SMALL_DEADLINE_S:g} s), --memory-budget {args.budget}")
    print_table([{"peak_rss_mb": round(f["peak_rss_bytes"] / 1e6), "serving_rss_mb": round(f["rss_serving_bytes"] / 1e6),
                  "big": f["big_outcomes"], "big_slowest_s": f["big_slowest_answer_s_by_code"],
                  "small": f["small_outcomes"], "small_ms": f["small_latency_ms"], "wall_s": f["wall_s"]}])
    if not args.skip_thrash and "fp32" in json.loads((Path(bundle) / "manifest.json").read_text())["variants"]:
        results["thrash"] = run_thrash(bundle, args.thrash_budget)
        t = results["thrash"]
        print(f"thrash: a=int8, b=fp32, --memory-budget {args.thrash_budget}, "
              f"{THRASH_ROUNDS} rounds of {THRASH_CALLS} + {THRASH_CALLS} calls")
        print_table([{"outcomes": t["outcomes"], "loads": t["loads"], "evictions": t["evictions"],
                      "peak_rss_mb": round(t["peak_rss_bytes"] / 1e6)}])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
