"""`serve` over a FakeProvider whose batches holding the word "hang" never end: a real
server process for the test that a hung run ends the process at once.

    python -m tests.hung_server PORT
"""

from __future__ import annotations

import asyncio
import logging
import sys

from edge_embed.server import ServerConfig, serve

from .fakes import FakeProvider


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    fake = FakeProvider()
    fake.hang.set()  # never cleared: the stuck thread stays stuck, as a wedged GPU call would
    config = ServerConfig(port=int(sys.argv[1]), run_timeout_s=1.0, grace_s=30.0)
    asyncio.run(serve(config, fake))


if __name__ == "__main__":
    main()
