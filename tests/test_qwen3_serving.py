"""Qwen3 queries with instructions: truncation that keeps the text, limits over every
entry point, and the same vectors over gRPC as in process."""

from __future__ import annotations

import numpy as np
import pytest

import edge_embed
from edge_embed.client import EmbedClient
from edge_embed.errors import InvalidInputError
from tests.servers import running_server
from tests.test_cli import run

pytestmark = pytest.mark.slow

TEXTS = ["what is a jetson", "the cat sat on the mat"]


def _longest_instruction(provider) -> str:
    """The longest "x x x ..." instruction the model accepts (found by bisection)."""
    low, high = 1, provider.manifest.max_length
    while low < high:
        mid = (low + high + 1) // 2
        try:
            provider.count_tokens(["a"], instruction="x " * mid)
            low = mid
        except InvalidInputError:
            high = mid - 1
    return "x " * low


@pytest.fixture(scope="module")
def qwen3(qwen3_bundle):
    with edge_embed.load(qwen3_bundle, precision="fp32") as provider:
        yield provider


def test_a_maximal_instruction_keeps_the_text_and_the_eos(qwen3):
    """Truncation cuts the text's end, never the instruction or the EOS; different texts
    keep different vectors however long the instruction.

    The query is tokenized in one piece, as the model's own code does: with Qwen's
    tokenizer the template's last ':' joins the text's first word ("Query:a" ends in one
    token), so the checks read the decoded text rather than a fixed id prefix.
    """
    m = qwen3.manifest
    instruction = _longest_instruction(qwen3)
    prompt = m.instruction_template.format(instruction=instruction, text="")
    decode = qwen3.tokenizer._tokenizer.decode
    assert len(qwen3.tokenizer.encode(["a"], instruction=instruction)[0]) >= m.max_length - 64  # a long one

    seqs = qwen3.tokenizer.encode(TEXTS, instruction=instruction)
    for seq, text in zip(seqs, TEXTS):
        assert seq[-1] == m.eos_token_id and len(seq) <= m.max_length
        assert decode(seq[:-1].tolist()) == prompt + text  # the whole instruction and the whole text
    vectors = qwen3.embed(TEXTS, instruction=instruction)
    assert not np.array_equal(vectors[0], vectors[1])
    # Each text's vector is its own: the same as alone, and not the other's.
    alone = np.vstack([qwen3.embed([t], instruction=instruction) for t in TEXTS])
    assert np.sum(vectors * alone, axis=1).min() >= 0.99999

    # A long text with the maximal instruction: the limit is filled with the instruction,
    # the text's head and the EOS.
    long_text = "the cat sat on the mat and then " * 100
    seq = qwen3.tokenizer.encode([long_text], instruction=instruction)[0]
    assert len(seq) == m.max_length and seq[-1] == m.eos_token_id
    kept = decode(seq[:-1].tolist())
    assert kept.startswith(prompt + "the cat sat") and len(kept) < len(prompt + long_text)
    with pytest.raises(InvalidInputError, match=r"texts\[0\] is longer"):
        qwen3.embed([long_text], instruction=instruction, truncate=False)


def test_an_instruction_that_leaves_too_little_room_is_refused(qwen3):
    for instruction in (_longest_instruction(qwen3) + "x x ", "x " * 20000):
        with pytest.raises(InvalidInputError, match=r"instruction takes \d+ tokens .* must leave at least 32"):
            qwen3.embed(TEXTS, instruction=instruction)
        with pytest.raises(InvalidInputError, match="instruction takes"):
            qwen3.count_tokens(TEXTS, instruction=instruction)


def test_qwen3_over_grpc_matches_the_python_api(qwen3):
    """Queries with an instruction, documents without, Matryoshka 32..full: the same vectors
    as in process; Info shows the default instruction; instruction limits hold."""
    instruction = qwen3.manifest.default_instruction
    with running_server(qwen3, max_instruction_chars=600) as (_, target), EmbedClient(target) as client:
        info = client.info()
        assert info.instruction_aware and info.default_instruction == instruction
        assert (info.min_dim, info.dim) == (32, 64) and info.batching.max_instruction_chars == 600
        for dims in (32, 48, 64):
            queries = client.embed(TEXTS, instruction=instruction, dimensions=dims)
            local = qwen3.embed(TEXTS, instruction=instruction, dimensions=dims)
            assert queries.shape == (2, dims) and np.sum(queries * local, axis=1).min() >= 0.99999
        documents = client.embed(TEXTS)
        assert np.sum(documents * qwen3.embed(TEXTS), axis=1).min() >= 0.99999
        assert np.sum(documents * client.embed(TEXTS, instruction=instruction), axis=1).max() < 0.9999
        assert client.tokenize(TEXTS[:1], instruction=instruction)[0] == \
            qwen3.tokenize(TEXTS[:1], instruction=instruction)[0].tolist()

        with pytest.raises(InvalidInputError, match="instruction has 601 characters; the limit is 600"):
            client.embed(TEXTS, instruction="y" * 601)
        with pytest.raises(InvalidInputError, match="instruction has 601 characters"):
            client.tokenize(TEXTS, instruction="y" * 601)
        # Within the characters, over the tokens: Qwen's tokenizer reads each digit as a token.
        with pytest.raises(InvalidInputError, match=r"instruction takes \d+ tokens"):
            client.embed(TEXTS, instruction="7" * 599)
        assert np.array_equal(client.embed(TEXTS), documents)  # the server still serves


def test_the_cli_refuses_an_instruction_that_erases_the_text(qwen3_bundle):
    done = run("embed", "--bundle", str(qwen3_bundle), "--instruction", "7" * 600, *TEXTS)
    assert done.returncode == 2
    assert "instruction takes" in done.stderr and "Traceback" not in done.stderr
