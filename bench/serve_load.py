"""Serving latency and throughput of `edge-embed serve` under open-loop load over gRPC.

The server runs as a separate process (INT8, default threads: all cores but one, which gRPC
needs) on a free 127.0.0.1 port. An asyncio client sends single-query requests at fixed
arrival times (open loop, 2 s deadline) for each rate, then sweeps --max-wait-ms at 50 QPS (one server per value), then measures closed-loop
saturation with 32 requests in flight against the in-process provider (one text per call,
and batches of 32). Latencies are client side, from the scheduled send time to the response,
over successful requests. Client and server share the machine: client CPU is reported too.
Prints tables and writes JSON (bench/results/serve_load.json by default).

    python bench/serve_load.py [--bundle PATH] [--rates 25,50,100] [--seconds 8] [--max-wait-ms 0] [--skip-sweep]
                               [--baseline OLD_BUNDLE]

--baseline adds the same gRPC saturation for another bundle (say, one with the old
per-tensor INT8 that runs one text per batch), in alternating rounds with --bundle's,
and their ratio.

--http serves the OpenAI-compatible HTTP API from the same process too, and runs every
open-loop rate over both transports, alternating (gRPC, then HTTP, at each rate), with
the same texts and deadline; HTTP requests are POST /v1/embeddings from one aiohttp
session (keep-alive connections, as the openai client keeps).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
WARMUP_S = 1.0
DEADLINE_S = 2.0
SWEEP_WAITS = (0, 2, 5, 10, 20)
SWEEP_QPS = 50
CONCURRENCY = 32
BATCH = 32
MAX_ERROR_SHARE = 0.05
MAX_P99_MS = 1000.0
P95_TARGET_MS = 25.0


Outcome = NamedTuple("Outcome", [("due", float), ("sent", float), ("done", float), ("status", str),
                                 ("queue_ms", float), ("inference_ms", float)])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_serving(target: str) -> bool:
    """Whether `edge-embed health` reports SERVING for target."""
    cmd = [PYTHON, "-m", "edge_embed.cli", "health", "--server", target, "--timeout", "1"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and done.stdout.strip() == "SERVING"


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def running_server(bundle: Path, max_wait_ms: float, start_timeout_s: float = 240.0, threads: int | None = None,
                   http_port: int | None = None):
    """An `edge-embed serve` process on a free port, SERVING; yields (target, pid)."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    cmd = [PYTHON, "-m", "edge_embed.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
           "--port", str(port), "--precision", "int8", "--max-wait-ms", str(max_wait_ms)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if http_port is not None:
        cmd += ["--http-port", str(http_port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + start_timeout_s
            while not is_serving(target):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"server on {target} never reported SERVING:\n{tail}")
                time.sleep(0.5)
            yield target, proc.pid
        finally:
            stop_process(proc)


async def send_one(client, text: str, due: float, outcomes: list[Outcome]) -> None:
    """Embed one text and append its Outcome; a failure is named by its gRPC status code."""
    import grpc

    loop = asyncio.get_running_loop()
    sent = loop.time()
    try:
        response = await client.embed_response([text])
    except Exception as exc:
        inner = exc.__context__
        status = inner.code().name if isinstance(inner, grpc.aio.AioRpcError) else type(exc).__name__
        outcomes.append(Outcome(due, sent, loop.time(), status, 0.0, 0.0))
        return
    outcomes.append(Outcome(due, sent, loop.time(), "OK", response.queue_ms, response.inference_ms))


async def send_one_http(session, url: str, text: str, due: float, outcomes: list[Outcome]) -> None:
    """POST one text to /v1/embeddings; a failure is named by its HTTP status or exception."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    try:
        async with session.post(url, json={"input": [text]}) as response:
            body = await response.read()
            status = "OK" if response.status == 200 and json.loads(body)["data"] else f"HTTP_{response.status}"
    except asyncio.TimeoutError:
        status = "TIMEOUT"
    except Exception as exc:
        status = type(exc).__name__
    outcomes.append(Outcome(due, sent, loop.time(), status, None, None))


async def open_loop(target: str, rate: float, seconds: float, texts: list[str], http_url: str | None = None) -> dict:
    """Requests due at i/rate for WARMUP_S + seconds; one row over those due after the warm-up.
    Over gRPC to target, or, with http_url, over HTTP to that /v1/embeddings URL."""
    from edge_embed.client import AsyncEmbedClient

    loop = asyncio.get_running_loop()
    outcomes: list[Outcome] = []
    async with contextlib.AsyncExitStack() as stack:
        if http_url is None:
            client = await stack.enter_async_context(AsyncEmbedClient(target, timeout=DEADLINE_S, retries=0))
            await client.info()

            def send(text: str, due: float):
                return send_one(client, text, due, outcomes)
        else:
            import aiohttp

            session = await stack.enter_async_context(aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=DEADLINE_S), connector=aiohttp.TCPConnector(limit=256)))
            await send_one_http(session, http_url, texts[0], loop.time(), [])

            def send(text: str, due: float):
                return send_one_http(session, http_url, text, due, outcomes)
        start = loop.time() + 0.05
        tasks = []
        for i in range(int((WARMUP_S + seconds) * rate)):
            due = start + i / rate
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(texts[i % len(texts)], due)))
        await asyncio.gather(*tasks)
    window_start = start + WARMUP_S
    return rate_row(rate, [o for o in outcomes if o.due >= window_start], window_start)


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile, rounded, or None when there are no values."""
    return round(float(np.percentile(values, q)), 2) if values else None


def rate_row(rate: float, outcomes: list[Outcome], window_start: float) -> dict:
    """Sent, ok, errors by code, latency percentiles and achieved QPS of one rate."""
    ok = [o for o in outcomes if o.status == "OK"]
    latency = [(o.done - o.due) * 1000 for o in ok]
    errors = Counter(o.status for o in outcomes if o.status != "OK")
    end = max((o.done for o in outcomes), default=window_start + 1)
    return {
        "qps": rate, "sent": len(outcomes), "ok": len(ok), "errors": sum(errors.values()),
        "error_codes": ",".join(f"{k}={v}" for k, v in sorted(errors.items())) or "-",
        "p50_ms": pct(latency, 50), "p95_ms": pct(latency, 95), "p99_ms": pct(latency, 99),
        "achieved_qps": round(len(ok) / max(end - window_start, 1e-9), 1),
        "send_lag_p99_ms": pct([(o.sent - o.due) * 1000 for o in outcomes], 99),
        "server_queue_ms_mean": mean([o.queue_ms for o in ok if o.queue_ms is not None]),
        "server_infer_ms_mean": mean([o.inference_ms for o in ok if o.inference_ms is not None]),
    }


def mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 2) if values else None


def overloaded(row: dict) -> bool:
    """Whether a rate broke the limits: more than 5% errors or P99 over 1 s."""
    return row["errors"] > MAX_ERROR_SHARE * max(row["sent"], 1) or (row["p99_ms"] or float("inf")) > MAX_P99_MS


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process, or of process pid (Linux /proc)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(target: str, server_pid: int, seconds: float, texts: list[str]) -> dict:
    """Texts/s with CONCURRENCY single-text requests always in flight, and the CPU each side used."""
    from edge_embed.client import AsyncEmbedClient

    loop = asyncio.get_running_loop()
    counts = Counter()
    cpu: dict[str, float] = {}
    async with AsyncEmbedClient(target, timeout=10.0, retries=0) as client:
        await client.info()
        begin = loop.time() + WARMUP_S
        end = begin + seconds

        async def worker(k: int) -> None:
            i = k
            while loop.time() < end:
                try:
                    await client.embed_response([texts[i % len(texts)]])
                    status = "ok"
                except Exception:
                    status = "error"
                if begin <= loop.time() < end:
                    counts[status] += 1
                i += CONCURRENCY

        async def meter() -> None:
            await asyncio.sleep(max(0.0, begin - loop.time()))
            cpu["client0"], cpu["server0"] = cpu_seconds(), cpu_seconds(server_pid)
            await asyncio.sleep(max(0.0, end - loop.time()))
            cpu["client1"], cpu["server1"] = cpu_seconds(), cpu_seconds(server_pid)

        await asyncio.gather(meter(), *(worker(k) for k in range(CONCURRENCY)))
    return {
        "mode": f"gRPC, {CONCURRENCY} in flight, 1 text/request", "texts_per_s": round(counts["ok"] / seconds, 1),
        "errors": counts["error"], "client_cpu_s": round(cpu["client1"] - cpu["client0"], 2),
        "server_cpu_s": round(cpu["server1"] - cpu["server0"], 2), "wall_s": seconds,
    }


def texts_per_second(fn, per_call: int, seconds: float) -> float:
    """Texts/s of calling fn(0), fn(1), ... for about `seconds`."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(calls)
        calls += 1
    return round(calls * per_call / (time.perf_counter() - start), 1)


def in_process(bundle: Path, seconds: float, texts: list[str]) -> list[dict]:
    """The provider in this process on the same texts: one text per call, and batches of BATCH."""
    import edge_embed

    n = len(texts)
    provider = edge_embed.load(bundle, precision="int8", threads=2)
    try:
        provider.embed(texts[:BATCH])
        single = texts_per_second(lambda i: provider.embed([texts[i % n]]), 1, seconds)
        batched = texts_per_second(
            lambda i: provider.embed([texts[(i * BATCH + j) % n] for j in range(BATCH)]), BATCH, seconds)
    finally:
        provider.close()
    return [{"mode": "in-process, 1 text/call", "texts_per_s": single},
            {"mode": f"in-process, batches of {BATCH}", "texts_per_s": batched}]


async def max_wait_sweep(bundle: Path, seconds: float, texts: list[str]) -> list[dict]:
    """P50/P95/P99 at SWEEP_QPS, restarting the server for each max-wait value."""
    rows = []
    for wait_ms in SWEEP_WAITS:
        with running_server(bundle, wait_ms) as (target, _):
            row = await open_loop(target, SWEEP_QPS, seconds, texts)
        rows.append({"max_wait_ms": wait_ms, **row})
    return rows


def print_table(rows: list[dict]) -> None:
    """Rows as plain columns, left-aligned under their keys."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[str(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    print()


async def saturation_vs_baseline(bundle: Path, baseline: Path, seconds: float, texts: list[str],
                                 threads: int | None, rounds: int = 2) -> dict:
    """gRPC saturation of two bundles, a fresh server each, in alternating rounds: a noisy
    neighbour hits both alike."""
    rates: dict[str, list[float]] = {"bundle": [], "baseline": []}
    for _ in range(rounds):
        for name, path in (("bundle", bundle), ("baseline", baseline)):
            with running_server(path, 0.0, threads=threads) as (target, pid):
                rates[name].append((await closed_loop(target, pid, seconds, texts))["texts_per_s"])
    return {"bundle_texts_per_s": rates["bundle"], "baseline_texts_per_s": rates["baseline"],
            "ratio": round(float(np.median(rates["bundle"]) / np.median(rates["baseline"])), 2)}


def best_rate(rows: list[dict]) -> float | None:
    """The highest rate whose P95 met the target without overload."""
    fine = [r["qps"] for r in rows if not overloaded(r) and r["p95_ms"] is not None and r["p95_ms"] < P95_TARGET_MS]
    return max(fine, default=None)


def summarize(rates: list[dict], sweep: list[dict], saturation: list[dict], max_wait_ms: float) -> dict:
    """Headline numbers: best rate under the P95 target, P95 at 50 QPS, saturation ratio."""
    http = [r for r in rates if r["transport"] == "http"]
    rates = [r for r in rates if r["transport"] == "grpc"]
    fine = best_rate(rates)
    at_50 = [r["p95_ms"] for r in rates if r["qps"] == SWEEP_QPS]
    at_50 += [r["p95_ms"] for r in sweep if r["max_wait_ms"] == max_wait_ms]
    by_mode = {r["mode"]: r["texts_per_s"] for r in saturation}
    grpc_tps, batched = saturation[0]["texts_per_s"], by_mode[f"in-process, batches of {BATCH}"]
    swept = [r for r in sweep if r["p95_ms"] is not None]
    over_http = {}
    if http:
        over_http = {
            f"http_highest_qps_with_p95_under_{P95_TARGET_MS:g}ms": best_rate(http),
            f"http_p95_ms_at_{SWEEP_QPS}_qps": next((r["p95_ms"] for r in http if r["qps"] == SWEEP_QPS), None),
        }
    return {
        f"highest_qps_with_p95_under_{P95_TARGET_MS:g}ms": fine,
        f"p95_ms_at_{SWEEP_QPS}_qps": at_50[0] if at_50 else None,
        **over_http,
        "saturation_grpc_over_in_process_batched": round(grpc_tps / batched, 3) if batched else None,
        "max_wait_ms_min_p95": min(swept, key=lambda r: r["p95_ms"])["max_wait_ms"] if swept else None,
    }


async def run(args, bundle: Path) -> dict:
    """All phases in order; servers are stopped before in-process timing."""
    from edge_embed.export.probes import PROBE_CATEGORIES

    texts = list(PROBE_CATEGORIES["query"])
    rates = [float(r) if "." in r else int(r) for r in args.rates.split(",") if r.strip()]
    http_port = free_port() if args.http else None
    http_url = f"http://127.0.0.1:{http_port}/v1/embeddings" if args.http else None
    transports = ("grpc", "http") if args.http else ("grpc",)
    with running_server(bundle, args.max_wait_ms, threads=args.server_threads, http_port=http_port) as (target, pid):
        rate_rows, skipped, broken = [], [], set()
        for k, rate in enumerate(rates):
            for transport in transports:
                if transport in broken:
                    continue
                cpu_before = cpu_seconds(pid)
                row = await open_loop(target, rate, args.seconds, texts, http_url if transport == "http" else None)
                # Server CPU over every request of the phase, the warm-up second's included.
                requests = int((WARMUP_S + args.seconds) * rate)
                row["server_cpu_ms_per_request"] = round((cpu_seconds(pid) - cpu_before) * 1000 / requests, 3)
                rate_rows.append({"transport": transport, **row})
                if overloaded(row):
                    broken.add(transport)
            if broken == set(transports):
                skipped = rates[k + 1:]
                break
        saturation = [await closed_loop(target, pid, args.seconds, texts)]
    saturation += in_process(bundle, args.seconds, texts)
    sweep = [] if args.skip_sweep else await max_wait_sweep(bundle, args.seconds, texts)
    versus = await saturation_vs_baseline(bundle, args.baseline, args.seconds, texts, args.server_threads,
                                          args.rounds) if args.baseline else None
    return {"rates": rate_rows, "skipped_rates": skipped, "saturation": saturation, "max_wait_sweep": sweep,
            "saturation_vs_baseline": versus}


def report(results: dict, args) -> None:
    """Print the tables and the summary."""
    print(f"open-loop rates (max-wait {args.max_wait_ms:g} ms, {args.seconds:g} s each after {WARMUP_S:g} s warm-up):")
    print_table(results["rates"])
    if results["skipped_rates"]:
        print(f"skipped rates (errors > 5% or P99 > 1 s): {results['skipped_rates']}\n")
    print(f"saturation ({os.cpu_count()} CPUs; client and server on the same machine):")
    print_table(results["saturation"])
    if results["max_wait_sweep"]:
        print(f"max-wait sweep at {SWEEP_QPS} QPS:")
        print_table(results["max_wait_sweep"])
        print(f"max-wait-ms with the lowest P95: {results['summary']['max_wait_ms_min_p95']}\n")
    if results["saturation_vs_baseline"]:
        print(f"gRPC saturation against {args.baseline} (alternating rounds, texts/s):",
              json.dumps(results["saturation_vs_baseline"]))
    print("summary:", json.dumps(results["summary"], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: the default model)")
    parser.add_argument("--rates", default="25,50,100,200,300,400,600", help="comma-separated QPS values")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per rate and phase")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="server max-wait for the rate sweep (the server default)")
    parser.add_argument("--skip-sweep", action="store_true", help="skip the max-wait sweep")
    parser.add_argument("--server-threads", type=int, help="the server's --threads (default: its own default)")
    parser.add_argument("--baseline", type=Path, help="another bundle to compare gRPC saturation with")
    parser.add_argument("--rounds", type=int, default=3, help="alternating saturation rounds with --baseline")
    parser.add_argument("--http", action="store_true",
                        help="also serve HTTP and run every rate over both transports, alternating")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_load.json")
    args = parser.parse_args()
    from edge_embed.default_model import ensure_default_bundle

    args.bundle = args.bundle or ensure_default_bundle()
    loadavg = os.getloadavg()
    results = asyncio.run(run(args, Path(args.bundle)))
    results["summary"] = summarize(results["rates"], results["max_wait_sweep"], results["saturation"],
                                   args.max_wait_ms)
    report(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in loadavg]},
        "config": {"bundle": str(args.bundle), "baseline": str(args.baseline or ""), "precision": "int8", "server_threads": args.server_threads or "default",
                   "in_process_threads": 2, "seconds": args.seconds,
                   "warmup_s": WARMUP_S, "deadline_s": DEADLINE_S, "max_wait_ms": args.max_wait_ms,
                   "transports": ["grpc", "http"] if args.http else ["grpc"]},
        **results,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
