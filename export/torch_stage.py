"""The PyTorch stage of an export (reference vectors, MLX weights, the raw ONNX graph), run as
its own interpreter: `python -m edge_embed.export.torch_stage JOB`.

A fresh interpreter, not a multiprocessing child, so the stage never imports the caller's
`__main__` (stdin under `python -`, or a script without a main guard that would run twice).
When it exits, every byte PyTorch held goes back to the OS before ONNX Runtime loads the
graph: PyTorch and the exporter keep references to a model that no `del` releases.

The parent writes the job (a pickle) into the export's work directory, relays the child's
progress lines (one JSON string a line on the child's stdout; the child's own stdout is
sent to stderr) and reads the outcome from a file beside the job. It never waits without a
deadline: a child that dies, however it dies, is reported within a poll interval.
"""

from __future__ import annotations

import json
import os
import pickle
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ExportError
from .source import SourceModel

__all__ = ["run_torch_stage", "RETRIEVAL_REFERENCE_FILE"]

JOB_FILE = "torch-stage.job.pickle"
OUTCOME_FILE = "torch-stage.outcome.pickle"
_POLL_S = 0.2
# A child that wrote its outcome but does not exit (a library thread hanging at teardown)
# is killed after this long: its result is safe on disk.
_EXIT_GRACE_S = 30.0
_DRAIN_S = 1.0


def run_torch_stage(job: dict, work: Path, progress: Callable[[str], None]) -> tuple[list[str], dict]:
    """Run `job` (the keyword arguments of `_run`) in a child interpreter and wait for it to
    exit; returns (external data files of the raw graph, MLX recipes per precision).
    Raises ExportError with the child's message, or naming the signal that killed it."""
    job_path, outcome_path = work / JOB_FILE, work / OUTCOME_FILE
    outcome_path.unlink(missing_ok=True)
    job_path.write_bytes(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
    try:
        returncode = _supervise([sys.executable, "-m", __name__, str(job_path)], outcome_path, progress)
        outcome = pickle.loads(outcome_path.read_bytes()) if outcome_path.is_file() else None
    finally:
        for path in (job_path, outcome_path, outcome_path.with_name(OUTCOME_FILE + ".partial")):
            path.unlink(missing_ok=True)
    if outcome is None:
        raise ExportError(_death(returncode))
    if outcome[0] == "error":
        _, kind, text = outcome
        if kind == "ExportError":
            raise ExportError(text)
        raise ExportError(f"the PyTorch export stage failed: {kind}: {text}")
    return outcome[1], outcome[2]


def _death(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        cause = "; out of memory? (the kernel's OOM killer sends SIGKILL)" if -returncode == signal.SIGKILL else ""
        return f"the PyTorch export stage was killed by {name}{cause}"
    return (f"the PyTorch export stage exited with code {returncode} before reporting a result "
            "(its error output is above)")


def _supervise(command: list[str], outcome_path: Path, progress: Callable[[str], None]) -> int:
    """Start the child, relay its progress until it exits, return its exit status."""
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    relay = _LineRelay(progress)
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    try:
        outcome_seen = None
        while child.poll() is None:
            if selector.get_map():
                for _ in selector.select(timeout=_POLL_S):
                    if not relay.read(child.stdout):
                        selector.unregister(child.stdout)
            else:
                time.sleep(_POLL_S)
            if outcome_seen is None and outcome_path.is_file():
                outcome_seen = time.monotonic()
            elif outcome_seen is not None and time.monotonic() - outcome_seen > _EXIT_GRACE_S:
                child.kill()
        # Lines written just before the exit; a grandchild holding the pipe open must not
        # keep us here, hence the deadline.
        deadline = time.monotonic() + _DRAIN_S
        while selector.get_map() and time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            if not relay.read(child.stdout):
                break
        relay.flush()
        return child.returncode
    finally:
        selector.close()
        if child.poll() is None:
            child.kill()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        child.stdout.close()


class _LineRelay:
    """Splits the child's stdout bytes into lines and hands each progress message on."""

    def __init__(self, progress: Callable[[str], None]):
        self.progress, self.pending = progress, b""

    def read(self, pipe) -> bool:
        """Relay what one read gives; False at end of file."""
        chunk = os.read(pipe.fileno(), 1 << 16)
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            self._relay(line)
        return bool(chunk)

    def flush(self) -> None:
        if self.pending:
            self._relay(self.pending)
            self.pending = b""

    def _relay(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            message = None
        if isinstance(message, str):
            self.progress(message)
        elif text.strip():
            # Printed by something else before the child took over its stdout.
            print(text, file=sys.stderr, flush=True)


RETRIEVAL_REFERENCE_FILE = "retrieval-reference.npy"


def _run(source: SourceModel, work: Path, texts: list[str], seqs: list[np.ndarray], mlx_wanted: tuple[str, ...],
         raw_path: Path, pairs: tuple | None, batch_tokens: int, progress: Callable[[str], None],
         retrieval_seqs: list[np.ndarray] = (), reference_path: Path | None = None) -> tuple[list[str], dict]:
    """Everything that needs the PyTorch model: golden.npz, the reference vectors of the
    retrieval probe corpus (`retrieval_seqs`, kept in the work folder, never shipped), MLX
    weights, the raw ONNX graph. The reference outputs are read from `reference_path` when
    an earlier export of the same source and probes kept them there, and kept there when not."""
    import torch

    from ..batching import plan_batches
    from ..bundle import GOLDEN_FILE
    from ..parity import scores_from_logits
    from ..platform import usable_cpu_count
    from ..tokenization import model_inputs
    from .graph import export_onnx, exporter_name, load_reference_model
    from .reference_cache import load_references, store_references

    torch.set_num_threads(usable_cpu_count())
    draft = source.manifest
    progress(f"loading the PyTorch FP32 model from {source.path}")
    model = load_reference_model(source)

    def forward(sequences: list[np.ndarray]) -> np.ndarray:
        out = np.empty((len(sequences), draft.dim), dtype=np.float32)
        with torch.inference_mode():
            for batch in plan_batches([len(s) for s in sequences], batch_tokens, 64):
                feeds = model_inputs([sequences[i] for i in batch], draft)
                out[batch] = model(*(torch.from_numpy(feeds[n]) for n in draft.graph_inputs)).numpy()
        return out

    kept = load_references(reference_path, len(seqs), len(retrieval_seqs)) if reference_path else None
    if kept is not None:
        reference, retrieval_reference = kept
        counted = f" and {len(retrieval_seqs)} retrieval probes" if len(retrieval_seqs) else ""
        progress(f"reference vectors: {len(seqs)} probe texts{counted}, kept by an earlier export of the same "
                 "model and probes")
    else:
        reference = forward(seqs)
        progress(f"reference vectors: {len(seqs)}/{len(seqs)} probe texts")
        retrieval_reference = forward(list(retrieval_seqs))
        if len(retrieval_seqs):
            progress(f"reference vectors: {len(retrieval_seqs)} retrieval probe queries and passages")
        if reference_path:
            store_references(reference_path, reference, retrieval_reference)
    if len(retrieval_seqs):
        np.save(work / RETRIEVAL_REFERENCE_FILE, retrieval_reference)
    if pairs is not None:
        queries, documents, groups = pairs
        np.savez(work / GOLDEN_FILE, queries=np.array(queries), documents=np.array(documents), groups=groups,
                 logits=reference[:, 0],
                 scores=scores_from_logits(reference[:, 0], draft.rerank.activation).astype(np.float32))
    else:
        np.savez(work / GOLDEN_FILE, texts=np.array(texts), vectors=reference)
    mlx = {}
    for precision in mlx_wanted:
        from .mlx_weights import save_mlx_weights

        mlx[precision] = save_mlx_weights(model.encoder, work / f"model.{precision}.safetensors",
                                          precision.removeprefix("mlx-"))
    progress(f"exporting the FP32 ONNX graph (torch.onnx, {exporter_name(source)})")
    sample = model_inputs(sorted(seqs, key=len)[-2:], draft)
    return export_onnx(model, source, raw_path, sample), mlx


def main(argv: list[str]) -> None:
    """The child: run the job named in argv, write its outcome beside it, exit."""
    job_path = Path(argv[0])
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not mix with progress

    def progress(message: str) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    try:
        outcome = ("done", *_run(**pickle.loads(job_path.read_bytes()), progress=progress))
    except BaseException as exc:  # noqa: BLE001 - the parent raises it with its message
        outcome = ("error", type(exc).__name__, str(exc))
    partial = job_path.with_name(OUTCOME_FILE + ".partial")
    partial.write_bytes(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
    partial.replace(job_path.with_name(OUTCOME_FILE))
    channel.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # As multiprocessing's children do: skip interpreter teardown, which can be slow or
    # hang on a library's threads; the OS takes the memory back either way.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
