"""Running a real gRPC server in a background event loop, for synchronous tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from edge_embed.server import ServerConfig, create_server


@contextlib.contextmanager
def running_server(provider, **config):
    """Yield (EdgeServer, "127.0.0.1:port"); the server lives on its own loop thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    cfg = ServerConfig(**{"host": "127.0.0.1", "port": 0, **config})
    edge, port = asyncio.run_coroutine_threadsafe(create_server(cfg, provider), loop).result(60)
    _LOOPS[id(edge)] = loop
    try:
        yield edge, f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(edge.stop(1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        _LOOPS.pop(id(edge), None)


_LOOPS: dict[int, asyncio.AbstractEventLoop] = {}


def on_server_loop(edge, coroutine):
    """Run a coroutine on a running_server's loop; returns its concurrent Future."""
    return asyncio.run_coroutine_threadsafe(coroutine, _LOOPS[id(edge)])


def settle(futures) -> list[tuple[str, object]]:
    """Wait for gRPC call futures: (status code name, the RpcError or None) for each, in order."""
    import grpc

    outcomes = []
    for future in futures:
        try:
            future.result()
            outcomes.append(("OK", None))
        except grpc.RpcError as exc:
            outcomes.append((exc.code().name, exc))
    return outcomes


def wait_until(condition, timeout: float = 5.0) -> bool:
    """Poll `condition` until it holds or `timeout` s pass; its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()
