"""Taxonomy text for CLIBD: the string "order family genus species" and its word vocabulary.

The text of a record is :func:`schema.taxonomy_text` of its ``<rank>_name`` fields
(missing ranks become ``not_classified``). :class:`TaxonomyVocab` is a word-level
vocabulary built from the training taxonomy: ids ``[PAD]`` = 0, ``[UNK]`` = 1,
``[CLS]`` = 2, ``[SEP]`` = 3, ``[MASK]`` = 4, then the words in lexical order. It encodes a
batch to fixed-length rows (``max_length`` = 20 by default: ``[CLS] words... [SEP]`` then
padding, truncated if longer) and is saved / loaded as JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bioscan_jax.data import schema
from bioscan_jax.data import fields

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
MAX_LENGTH = 20


class WordPieceVocab:
    """A BERT WordPiece tokenizer (``vocab.txt``, lower-cased: ``prajjwal1/bert-small``'s), with the
    :class:`TaxonomyVocab` interface: CLIBD's text input (``dataset.py::Dataset_for_CL``:
    ``tokenizer([text], padding="max_length", max_length=20, truncation=True)``), ``[CLS] ...
    [SEP]`` then ``[PAD]``. Built with the ``tokenizers`` library; picklable (rebuilt from the file)."""

    def __init__(self, vocab_file: str, max_length: int = MAX_LENGTH, lowercase: bool = True):
        self.vocab_file, self.max_length, self.lowercase = str(vocab_file), int(max_length), bool(lowercase)
        self._tok = None

    def _tokenizer(self):
        if self._tok is None:
            from tokenizers import BertWordPieceTokenizer

            tok = BertWordPieceTokenizer(self.vocab_file, lowercase=self.lowercase)
            pad = tok.token_to_id(PAD)
            if pad is None:
                raise ValueError(f"{self.vocab_file}: no {PAD} token in the WordPiece vocabulary")
            tok.enable_truncation(self.max_length)
            tok.enable_padding(length=self.max_length, pad_id=pad, pad_token=PAD)
            self._tok = tok
        return self._tok

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tok"} | {"_tok": None}

    def __len__(self) -> int:
        return self._tokenizer().get_vocab_size()

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [B, max_length], attention_mask bool [B, max_length])``."""
        encoded = self._tokenizer().encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encoded], dtype=np.int32).reshape(len(texts), self.max_length)
        mask = np.asarray([e.attention_mask for e in encoded], dtype=bool).reshape(len(texts), self.max_length)
        return ids, mask


def taxonomy_texts(records: Sequence[Mapping[str, Any]], ranks: Sequence[str] = schema.EVAL_RANKS) -> list[str]:
    """The taxonomy string of each record (normalised records: ``<rank>_name`` is ``str``, ``''`` = missing)."""
    frame = pd.DataFrame(
        {r: [rec.get(fields.name_feature(r)) or None for rec in records] for r in ranks}, dtype=object
    )
    return schema.taxonomy_text(frame, ranks)


@dataclasses.dataclass(frozen=True)
class TaxonomyVocab:
    """Word-level vocabulary of taxonomy strings (see the module docstring)."""

    words: tuple[str, ...]
    max_length: int = MAX_LENGTH
    add_cls: bool = True
    add_sep: bool = True

    def __post_init__(self):
        if len(set(self.words)) != len(self.words) or set(self.words) & set(SPECIAL_TOKENS):
            raise ValueError("vocabulary words must be unique and must not be special tokens")
        if self.max_length < 1 + int(self.add_cls) + int(self.add_sep):
            raise ValueError(f"max_length {self.max_length} is too small")
        object.__setattr__(self, "_ids", {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(self.words)})

    @classmethod
    def build(cls, texts: Iterable[str], *, min_count: int = 1, **kwargs) -> "TaxonomyVocab":
        """Vocabulary of the words that occur at least ``min_count`` times in ``texts``."""
        counts = collections.Counter(w for t in texts for w in t.split())
        return cls(tuple(sorted(w for w, c in counts.items() if c >= min_count)), **kwargs)

    @classmethod
    def from_metadata(cls, csv_path, split: str = "train", **kwargs) -> "TaxonomyVocab":
        """Vocabulary of the taxonomy of a split of the metadata CSV (default: train)."""
        return cls.build(schema.taxonomy_text(schema.read_metadata(csv_path, split=split)), **kwargs)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], **kwargs) -> "TaxonomyVocab":
        """Vocabulary of the taxonomy of normalised records (e.g. a training data source)."""
        return cls.build(taxonomy_texts(list(records)), **kwargs)

    def __len__(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.words)

    @property
    def vocab_size(self) -> int:
        return len(self)

    def token_id(self, word: str) -> int:
        return self._ids.get(word, UNK_ID)  # type: ignore[attr-defined]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 [B, max_length], attention_mask bool [B, max_length])``."""
        ids = np.full((len(texts), self.max_length), PAD_ID, dtype=np.int32)
        lookup = self._ids  # type: ignore[attr-defined]
        body = self.max_length - int(self.add_cls) - int(self.add_sep)
        for row, text in enumerate(texts):
            tokens = [lookup.get(w, UNK_ID) for w in text.split()[:body]]
            if self.add_cls:
                tokens.insert(0, CLS_ID)
            if self.add_sep:
                tokens.append(SEP_ID)
            ids[row, : len(tokens)] = tokens
        return ids, ids != PAD_ID

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Tokens of one row of ids (padding dropped)."""
        table = SPECIAL_TOKENS + self.words
        return [table[i] for i in ids if i != PAD_ID]

    def to_json(self) -> str:
        return json.dumps(
            {
                "special_tokens": list(SPECIAL_TOKENS),
                "words": list(self.words),
                "max_length": self.max_length,
                "add_cls": self.add_cls,
                "add_sep": self.add_sep,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> "TaxonomyVocab":
        data = json.loads(text)
        if tuple(data.get("special_tokens", SPECIAL_TOKENS)) != SPECIAL_TOKENS:
            raise ValueError(f"special tokens {data['special_tokens']} differ from {list(SPECIAL_TOKENS)}")
        return cls(tuple(data["words"]), data["max_length"], data["add_cls"], data["add_sep"])

    def save(self, path) -> None:
        from etils import epath

        epath.Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> "TaxonomyVocab":
        from etils import epath

        return cls.from_json(epath.Path(path).read_text())
