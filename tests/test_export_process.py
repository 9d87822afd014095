"""The export as users start it: from `python -` and from scripts without a main guard, its
PyTorch stage in a child that can die; and what `overwrite` may replace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_embed.errors import ExportError

from .conftest import MINILM_ID, minilm_source

STAGE_MODULE = "edge_embed.export.torch_stage"
EXPORT_TIMEOUT_S = 600
MARKER = "imported-the-user-script"


def _python(args: list[str], *, stdin: str | None = None, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True,
                          timeout=EXPORT_TIMEOUT_S, cwd=cwd)


@pytest.fixture(scope="module")
def stdin_export(tmp_path_factory, qwen3_source) -> tuple[subprocess.CompletedProcess, Path]:
    """An fp32 export of the tiny Qwen3 run as a heredoc script: `python - <<EOF ... EOF`."""
    folder = tmp_path_factory.mktemp("stdin-export")
    script = (
        "from edge_embed.export import export\n"
        f"manifest = export({str(qwen3_source)!r}, 'bundle', 'fp32', model_id='tiny-qwen3')\n"
        "print('exported', sorted(manifest.variants))\n"
    )
    return _python(["-"], stdin=script, cwd=folder), folder / "bundle"


@pytest.mark.slow
def test_export_from_stdin_finishes_and_writes_a_bundle(stdin_export, qwen3_source):
    done, bundle = stdin_export
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "exported ['fp32']"
    assert "loading the PyTorch FP32 model" in done.stderr  # the child's progress is relayed
    assert json.loads((bundle / "manifest.json").read_text())["variants"].keys() == {"fp32"}
    assert not list(bundle.glob("torch-stage*"))  # the stage's job and outcome files do not ship
    with pytest.raises(ExportError, match="already holds a bundle"):
        from edge_embed.export import export

        export(qwen3_source, bundle, "fp32", model_id="tiny-qwen3")


@pytest.mark.slow
def test_script_without_main_guard_runs_once_and_overwrite_replaces_a_bundle(stdin_export, qwen3_source, tmp_path):
    done, bundle = stdin_export
    assert done.returncode == 0, done.stderr
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    (target / "left-over.txt").write_text("from the bundle being replaced")
    script = tmp_path / "export_qwen3.py"
    script.write_text(
        f"print({MARKER!r}, flush=True)\n"
        "from edge_embed.export import export\n"
        f"export({str(qwen3_source)!r}, {str(target)!r}, 'fp32', model_id='qwen3-again', overwrite=True)\n"
    )
    done = _python([str(script)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(MARKER) == 1, done.stdout
    assert json.loads((target / "manifest.json").read_text())["model_id"] == "qwen3-again"
    assert not (target / "left-over.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "export_qwen3.py"]


def _children_running(module: str) -> list[int]:
    """This process's children whose command line names `module` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and module.encode() in argv:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the child through /proc")
def test_a_killed_torch_stage_is_reported_within_seconds(tmp_path):
    from edge_embed.export import export

    killed: list[float] = []

    def kill_the_stage(message: str) -> None:
        if message.startswith("loading the PyTorch FP32 model") and not killed:
            (pid,) = _children_running(STAGE_MODULE)
            os.kill(pid, signal.SIGKILL)
            killed.append(time.monotonic())

    with pytest.raises(ExportError, match="killed by SIGKILL; out of memory"):
        export(minilm_source(), tmp_path / "bundle", "fp32", model_id=MINILM_ID, progress=kill_the_stage)
    assert killed and time.monotonic() - killed[0] < 10
    assert list(tmp_path.iterdir()) == []  # neither a bundle nor the work directory is left
    assert _children_running(STAGE_MODULE) == []


@pytest.mark.parametrize("content", [
    {"notes.txt": "my notes"},
    {"manifest.json": json.dumps({"name": "a web app", "start_url": "/"}), "index.html": "<html></html>"},
    {"manifest.json": "not json"},
])
def test_overwrite_refuses_a_folder_that_is_not_a_bundle_before_any_work(tmp_path, content):
    from edge_embed.export import export

    target = tmp_path / "mine"
    target.mkdir()
    for name, text in content.items():
        (target / name).write_text(text)
    said: list[str] = []
    with pytest.raises(ExportError, match="holds no edge-embed bundle"):
        export(minilm_source(), target, "fp32", overwrite=True, progress=said.append)
    assert said == []
    assert {p.name: p.read_text() for p in target.iterdir()} == content
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_export_refuses_a_file_as_its_output(tmp_path):
    from edge_embed.export import export

    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(ExportError, match="is not a directory"):
        export(minilm_source(), target, "fp32", overwrite=True)
    assert target.read_text() == "a file"
