"""The flood a user's misbehaving client can send, against a real `edge-embed serve`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_a_flood_of_huge_requests_stays_in_budget_and_small_calls_keep_answering(minilm_bundle, tmp_path):
    """64 concurrent calls of 240 texts x 30,000 characters against INT8 MiniLM with a 1 GiB
    budget, five one-text calls (3 s deadlines) during it: the server's peak RSS stays in
    the budget, every small call is answered in time, and big calls that cannot be served
    are refused fast (RESOURCE_EXHAUSTED), never left to time out."""
    out = tmp_path / "flood.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "serve_flood.py"), "--bundle", str(minilm_bundle),
                           "--budget", "1GiB", "--skip-thrash", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    flood = json.loads(out.read_text())["flood"]
    assert flood["peak_rss_bytes"] <= 1024**3, flood
    assert flood["small_outcomes"] == ["OK"] * 5, flood
    assert max(flood["small_latency_ms"]) < 3000, flood
    assert set(flood["big_outcomes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, flood
    assert flood["big_outcomes"].get("OK", 0) >= 1, flood
    assert flood["big_slowest_answer_s_by_code"].get("RESOURCE_EXHAUSTED", 0) < 10, flood
    assert flood["still_serving"]
