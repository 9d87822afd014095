"""Turning texts into token ids exactly as the bundle's manifest prescribes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import BundleError, InvalidInputError
from .manifest import Manifest

__all__ = ["BundleTokenizer", "check_texts", "check_query", "pad_batch", "model_inputs", "MIN_TEXT_TOKENS"]

# An instruction must leave at least this many of the model's tokens for the text (or half
# the model's limit, if that is smaller): truncation cuts the text, never the instruction,
# so a longer instruction would give every text the same vector.
MIN_TEXT_TOKENS = 32


def check_texts(texts: object, field: str = "texts") -> list[str]:
    """Validate a caller's texts: a sequence of non-empty strings (a bare str is refused).

    `field` is the name errors use for the texts (the server says `inputs`).
    """
    if isinstance(texts, (str, bytes)):
        raise InvalidInputError(f"{field} must be a list of strings, not a single string")
    if not isinstance(texts, Sequence):
        raise InvalidInputError(f"{field} must be a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"{field}[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InvalidInputError(f"{field}[{i}] is empty or only whitespace")
    return list(texts)


def check_query(query: object) -> str:
    """Validate a reranker's query: one non-empty string."""
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a string, got {type(query).__name__}")
    if not query.strip():
        raise InvalidInputError("query is empty or only whitespace")
    return query


class BundleTokenizer:
    """The bundle's `tokenizers` tokenizer plus the manifest's rules (EOS, limits, prompts).

    User text (texts, queries, documents, instructions) never becomes special tokens: a
    document holding `<|im_end|>` or a query holding `[SEP]` is read as those characters,
    so it cannot end a turn, open a new one or move a segment boundary. Two tokenizers do
    this without per-call state shared between threads: one reads special-token strings as
    text (for user text), one as control tokens (for the model's own template parts). The
    post-processor's tokens (CLS/SEP, EOS) are added by both.
    """

    def __init__(self, tokenizer_path: Path, manifest: Manifest):
        self._manifest = manifest
        self._tokenizer = _load(tokenizer_path)
        self._text_tokenizer = _load(tokenizer_path)
        self._text_tokenizer.encode_special_tokens = True
        self._user_tokenizer = _load(tokenizer_path)  # never truncates: callers cut by hand
        self._user_tokenizer.encode_special_tokens = True
        # Longest first, so that a special token that starts another one cannot split it.
        specials = sorted((t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        if manifest.task == "rerank":
            # Pairs are cut by hand (the document only), so the tokenizer never truncates.
            self.min_text_tokens = min(MIN_TEXT_TOKENS, manifest.max_length // 4)
            self.prefix_chars = max(2048, 8 * manifest.max_length)
            return
        template = manifest.instruction_template
        if template is not None and self._special_pattern is not None and self._special_pattern.search(template):
            # Queries are tokenized whole as user text, which would turn the template's own
            # control tokens into text.
            raise BundleError(f"manifest instruction_template {template!r} holds a special token of the "
                              "tokenizer, which an embedder's template cannot hold")
        # With append_eos the runtime adds EOS itself, so the tokenizer keeps one slot free.
        self._limit = manifest.max_length - (1 if manifest.append_eos else 0)
        self._text_tokenizer.enable_truncation(self._limit)
        # Tokens the post-processor adds (EOS, CLS/SEP): truncation keeps room for them.
        self._specials = self._tokenizer.post_processor.num_special_tokens_to_add(False) \
            if self._tokenizer.post_processor is not None else 0
        self.min_text_tokens = min(MIN_TEXT_TOKENS, manifest.max_length // 2)
        # Words are rarely longer than 8 characters a token; longer texts try a prefix first.
        self.prefix_chars = max(2048, 8 * manifest.max_length)

    def user_text_ids(self, text: str) -> list[int]:
        """A user's text as tokens: its special-token strings stay text; no post-processor
        tokens, no truncation."""
        return self._user_tokenizer.encode(text, add_special_tokens=False).ids

    def user_text_split(self, text: str, fixed_chars: int) -> tuple[list[int], int]:
        """A run of text as tokens, tokenized whole, and how many of its first tokens start
        within its first `fixed_chars` characters: a template's text and a user's text that
        follows it get the tokens the whole prompt gives them, and a cut of the user's text
        knows where it must stop."""
        encoding = self._user_tokenizer.encode(text, add_special_tokens=False)
        fixed = sum(1 for start, _ in encoding.offsets if start < fixed_chars)
        return encoding.ids, fixed

    def split_specials(self, text: str) -> list[str]:
        """`text` as alternating pieces: text at even positions, the tokenizer's special
        tokens at odd ones."""
        return self._special_pattern.split(text) if self._special_pattern is not None else [text]

    def template_ids(self, template: str, fill: dict[str, str]) -> list[int]:
        """A model's template part as tokens: its special tokens are control tokens; the text
        between them, with the user's `fill` values put in, is tokenized as user text."""
        pieces = self._special_pattern.split(template) if self._special_pattern is not None else [template]
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                ids.append(self._tokenizer.token_to_id(piece))
                continue
            for name, value in fill.items():
                piece = value.join(piece.split("{" + name + "}"))
            if piece:
                ids += self.user_text_ids(piece)
        return ids

    def token_id(self, token: str) -> int:
        found = self._tokenizer.token_to_id(token)
        if found is None:
            raise BundleError(f"the bundle's tokenizer has no token {token!r}")
        return found

    def format(self, texts: list[str], instruction: str | None) -> list[str]:
        """Apply the model's instruction template (queries); documents pass unchanged.

        The template ends with the text, so truncation, which cuts from the end, cuts the
        text and never the instruction; an instruction that leaves fewer than
        `min_text_tokens` tokens for the text is refused.
        """
        if instruction is None:
            return texts
        template = self._manifest.instruction_template
        if template is None:
            raise InvalidInputError(
                f"{self._manifest.model_id} does not take instructions; embed without one"
            )
        if not isinstance(instruction, str) or not instruction.strip():
            raise InvalidInputError("instruction must be a non-empty string")
        prefix = template.format(instruction=instruction, text="")
        self._check_prefix(prefix)
        return [prefix + t for t in texts]

    def _check_prefix(self, prefix: str) -> None:
        """Refuse an instruction whose formatted prefix leaves too little of the limit for the text."""
        enc = self._text_tokenizer.encode(prefix, add_special_tokens=False)
        used = len(enc.ids) + sum(len(o.ids) for o in enc.overflowing)
        room = self._limit - self._specials - used
        if room < self.min_text_tokens:
            raise InvalidInputError(
                f"instruction takes {used} tokens with the model's template, which leaves {max(room, 0)} of "
                f"{self._manifest.model_id}'s {self._manifest.max_length} tokens for the text; an instruction "
                f"must leave at least {self.min_text_tokens}"
            )

    def encode(self, texts: list[str], *, instruction: str | None = None, truncate: bool = True,
               field: str = "texts") -> list[np.ndarray]:
        """Token ids per text (int64, unpadded), the instruction template applied.

        truncate=False refuses over-long texts. A text far longer than the model's limit is
        tokenized from a prefix of `prefix_chars` characters when that provably gives the
        same kept tokens (the cut falls in a word after the last kept one), so a huge text
        costs what the model reads, not what was sent; otherwise it is tokenized whole.
        """
        cut = [t if len(t) <= self.prefix_chars else t[: self.prefix_chars] for t in texts]
        encodings = self._text_tokenizer.encode_batch(self.format(cut, instruction))
        whole = [i for i, t in enumerate(texts) if len(t) > self.prefix_chars and not _cut_is_exact(encodings[i])]
        if whole:
            redone = self._text_tokenizer.encode_batch(self.format([texts[i] for i in whole], instruction))
            for i, enc in zip(whole, redone):
                encodings[i] = enc
        ids = []
        for i, enc in enumerate(encodings):
            if not truncate and enc.overflowing:
                raise InvalidInputError(
                    f"{field}[{i}] is longer than the model's {self._manifest.max_length} tokens "
                    "and truncate is false"
                )
            seq = np.asarray(enc.ids, dtype=np.int64)
            if self._manifest.append_eos and (seq.size == 0 or seq[-1] != self._manifest.eos_token_id):
                seq = np.append(seq, np.int64(self._manifest.eos_token_id))
            ids.append(seq)
        return ids

    # -- reranker pairs -------------------------------------------------------------------

    def encode_pairs(self, query: str, documents: list[str], *, instruction: str | None = None,
                     truncate: bool = True, field: str = "documents") -> list[np.ndarray]:
        """Token ids of each (query, document) pair, as the reranker was trained to read them.

        A pair longer than the model's limit loses the end of its document; the template
        and the query are never cut. A query (with its instruction) that leaves fewer than
        `min_text_tokens` for the document is refused, as is an over-long document with
        truncate=False.
        """
        spec = self._manifest.rerank
        if spec is None:
            raise InvalidInputError(f"{self._manifest.model_id} is not a reranker")
        if spec.format == "template":
            head_ids, doc_prefix, tail_ids = self._template_parts(query, instruction)
            head, specials = None, 0
        else:
            if instruction is not None:
                raise InvalidInputError(f"{self._manifest.model_id} does not take instructions; rerank without one")
            head, doc_prefix = self._text_tokenizer.encode(query, add_special_tokens=False), ""
            head_ids, tail_ids = head.ids, []
            specials = self._tokenizer.post_processor.num_special_tokens_to_add(True) \
                if self._tokenizer.post_processor is not None else 0
        fixed = len(head_ids) + specials + len(tail_ids)
        room = self._manifest.max_length - fixed
        if room < self.min_text_tokens:
            raise InvalidInputError(
                f"the query takes {fixed} tokens with the model's template, which leaves {max(room, 0)} of "
                f"{self._manifest.model_id}'s {self._manifest.max_length} tokens for the document; a query must "
                f"leave at least {self.min_text_tokens}")
        docs = [doc_prefix + (d if len(d) <= self.prefix_chars else d[: self.prefix_chars]) for d in documents]
        encodings = self._text_tokenizer.encode_batch(docs, add_special_tokens=False)
        out = []
        for i, enc in enumerate(encodings):
            if len(documents[i]) > self.prefix_chars and not _prefix_covers(enc, room):
                enc = self._text_tokenizer.encode(doc_prefix + documents[i], add_special_tokens=False)
            if len(enc.ids) > room:
                if not truncate:
                    raise InvalidInputError(
                        f"{field}[{i}] makes a pair longer than the model's {self._manifest.max_length} tokens "
                        "and truncate is false")
                enc.truncate(room)
            if head is None:
                ids = [*head_ids, *enc.ids, *tail_ids]
            else:
                ids = self._tokenizer.post_process(head, enc, add_special_tokens=True).ids
            out.append(np.asarray(ids, dtype=np.int64))
        return out

    def _template_parts(self, query: str, instruction: str | None) -> tuple[list[int], str, list[int]]:
        """The template's token ids before and after the document, and the whitespace that
        leads the document: tokenized with the document, as the model saw it in one piece.

        The template's special tokens are its own control tokens; between them, its text
        and the query and instruction put into it are tokenized together as user text, so
        each run of text gets the tokens the whole prompt would give it.
        """
        spec = self._manifest.rerank
        if instruction is None:
            instruction = spec.default_instruction or ""
        elif not spec.takes_instruction:
            raise InvalidInputError(f"{self._manifest.model_id} does not take instructions; rerank without one")
        elif not isinstance(instruction, str) or not instruction.strip():
            raise InvalidInputError("instruction must be a non-empty string")
        before, after = spec.template.split("{document}", 1)
        # Text and special tokens alternate: text at even positions, specials at odd ones.
        pieces = self._special_pattern.split(before) if self._special_pattern is not None else [before]
        head: list[int] = []
        lead = ""
        for k, piece in enumerate(pieces):
            if k % 2:
                head.append(self._tokenizer.token_to_id(piece))
                continue
            # Plain replacement, not str.format: braces in a query or instruction stay literal.
            text = query.join(part.replace("{instruction}", instruction) for part in piece.split("{query}"))
            if k == len(pieces) - 1:
                stripped = text.rstrip(" ")
                text, lead = stripped, text[len(stripped):]
            if text:
                head += self._text_tokenizer.encode(text, add_special_tokens=False).ids
        tail = self._tokenizer.encode(after, add_special_tokens=False).ids
        return head, lead, tail


def _load(tokenizer_path: Path) -> Tokenizer:
    """The bundle's tokenizer with no padding and no truncation: the caller sets its limits."""
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise BundleError(f"cannot load tokenizer {tokenizer_path}: {exc}") from exc
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _prefix_covers(encoding, room: int) -> bool:
    """Whether a document tokenized from a cut prefix has its first `room` tokens exact:
    they all come from words before the last two (see `_cut_is_exact`)."""
    if len(encoding.ids) <= room:
        return False
    kept = [w for w in encoding.word_ids[:room] if w is not None]
    words = [w for w in encoding.word_ids if w is not None]
    return bool(kept) and max(kept) < max(words) - 1


def _cut_is_exact(encoding) -> bool:
    """Whether tokenizing a cut prefix kept exactly the tokens the whole text would keep.

    Pre-tokenizers split text into words locally, so words wholly before the cut tokenize
    the same; the last two words of the prefix (the one the cut split, and whitespace
    handling next to it) may not. The kept tokens must all come from earlier words.
    """
    if not encoding.overflowing:
        return False  # the prefix fits: the cut may have dropped tokens the model would read
    kept = [w for w in encoding.word_ids if w is not None]
    last = [w for w in encoding.overflowing[-1].word_ids if w is not None]
    return bool(kept) and bool(last) and max(kept) < max(last) - 1


def pad_batch(
    seqs: Sequence[np.ndarray], pad_id: int, side: str, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pad token id sequences to one width (the longest, or `width`): (input_ids,
    attention_mask), both int64."""
    width = max(len(s) for s in seqs) if width is None else width
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        if side == "left":
            ids[row, width - len(seq):] = seq
            mask[row, width - len(seq):] = 1
        else:
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
    return ids, mask


def model_inputs(
    seqs: Sequence[np.ndarray], manifest: Manifest
) -> dict[str, np.ndarray]:
    """The padded arrays for exactly the graph inputs the manifest lists."""
    ids, mask = pad_batch(seqs, manifest.pad_token_id, manifest.padding_side,
                          manifest.max_length if manifest.pad_to_max_length else None)
    arrays = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in manifest.graph_inputs:
        # Positions count real tokens only, so a left-padded text sees the same positions
        # as when it is alone.
        arrays["position_ids"] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    if "token_type_ids" in manifest.graph_inputs:
        arrays["token_type_ids"] = np.zeros_like(ids)
    return {name: arrays[name] for name in manifest.graph_inputs}
