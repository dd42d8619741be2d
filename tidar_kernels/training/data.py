"""Training data, offline: a text corpus, a tokenizer with a mask token, packed rows.

* :func:`build_corpus` reads local sources (files, globs, directories, JSONL
  files with a text field) or, by default, the Python standard library sources
  of the running interpreter: real code nobody in this project wrote, present on
  every machine that runs the package. Documents are split into train and
  held-out by a hash of their name, so the split is deterministic and does not
  depend on which other files exist.
* :func:`train_tokenizer` trains a byte-level BPE on the training split in
  seconds, as a :class:`~tidar_kernels.model.tokenizer.TextTokenizer` (the ids
  the trainer needs: end of text and a dedicated mask token).
* :func:`pack_documents` concatenates tokenized documents (each followed by the
  end-of-text token) into fixed-length rows and records the document id of every
  token, so the loss can drop labels that cross a boundary
  (:func:`tidar_kernels.training.build_training_batch`).
* :class:`BatchSampler` walks the packed rows in a seeded per-epoch order and
  has a small state dict, so a resumed run sees exactly the rows it would have.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ..kernels.validation import check_int
from ..model.tokenizer import EOS_TOKEN, MASK_TOKEN, TextTokenizer
from .objective import PAD_DOC_ID


TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini", ".yaml", ".yml")
"""File suffixes read from a directory source, besides ``.jsonl`` (a glob or a file path reads any file)."""


@dataclass
class Document:
    name: str  # the split key: a path relative to its source, or "file.jsonl:line"
    text: str


@dataclass
class Corpus:
    """Documents split into training and held-out parts."""

    train: list[Document]
    heldout: list[Document]
    sources: list[str] = field(default_factory=list)

    def describe(self) -> str:
        chars = sum(len(d.text) for d in self.train)
        return (f"{len(self.train)} train documents ({chars / 1e6:.2f} M chars), {len(self.heldout)} held-out, "
                f"from {', '.join(self.sources)}")


# ----------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------


def stdlib_dir() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> list[Document]:
    """The ``.py`` files of the standard library, without third-party packages and test suites.

    Tests are left out because they hold generated and binary-looking data that
    is not representative code; ``site-packages`` is not the standard library.
    """
    root = stdlib_dir()
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts[:-1]):
            continue
        text = _read_text(path)
        if text:
            docs.append(Document(rel.as_posix(), text))
    return docs


STDLIB_SOURCE = "stdlib"
"""The source name of the standard library's sources (what no source at all reads), to combine with others."""

PACKAGE_DOCS_PREFIX = "docs:"
"""A source ``docs:NAME`` reads the documentation of the installed distribution ``NAME``."""

DOC_SUFFIXES = (".md", ".rst", ".txt")


def package_documents(name: str) -> list[Document]:
    """An installed distribution's documentation: its long description and shipped doc files.

    The description is the README that ``pip show`` metadata carries; doc files
    are the ``.md`` / ``.rst`` / ``.txt`` files it installs outside its
    ``.dist-info`` (licence texts and entry points are not documentation).
    Split keys are ``docs:NAME/<path>``.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise ValueError(f"data source {PACKAGE_DOCS_PREFIX}{name}: no installed distribution named {name!r}; "
                         "expected the name of an installed package (pip list)") from None
    docs = []
    description = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
    if description.strip():
        docs.append(Document(f"{PACKAGE_DOCS_PREFIX}{name}/DESCRIPTION", description))
    for file in sorted(dist.files or [], key=str):
        if file.suffix in DOC_SUFFIXES and not any(part.endswith(".dist-info") for part in file.parts):
            if text := _read_text(Path(file.locate())):
                docs.append(Document(f"{PACKAGE_DOCS_PREFIX}{name}/{file.as_posix()}", text))
    return docs


def read_source(source: str, text_field: str = "text") -> list[Document]:
    """Documents of one source: a ``.jsonl`` file, a text file, a directory, a glob pattern,
    ``stdlib`` (the standard library, the default corpus; a directory of that name is
    ``./stdlib``) or ``docs:NAME`` (an installed package's documentation, :func:`package_documents`)."""
    if source == STDLIB_SOURCE:
        return stdlib_documents()
    if source.startswith(PACKAGE_DOCS_PREFIX):
        return package_documents(source[len(PACKAGE_DOCS_PREFIX):])
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
        return _read_files(files, root=path, text_field=text_field)
    if path.is_file():
        if path.suffix == ".jsonl":
            return _read_jsonl(path, text_field)
        text = _read_text(path)
        return [Document(path.name, text)] if text else []
    matches = sorted(glob.glob(source, recursive=True))
    if not matches and not glob.has_magic(source):
        raise ValueError(f"data source {source!r} is not a file, a directory or a glob pattern that matches")
    # the pattern's literal leading directories, e.g. "src" of "src/**/*.py"
    root = Path(*itertools.takewhile(lambda part: not glob.has_magic(part), Path(source).parts))
    return _read_files([Path(m) for m in matches if Path(m).is_file()], root=root, text_field=text_field)


def _read_files(files: Sequence[Path], root: Path, text_field: str) -> list[Document]:
    """Documents of ``files`` found under ``root``; JSONL files give one document per line.

    The split key is the path relative to ``root``: the same however the source is
    spelled ("data", "data/", "./data", an absolute path), so a resumed run sees the
    same split, and distinct for files of the same name in different folders.
    """
    docs = []
    for file in files:
        if file.suffix == ".jsonl":
            docs.extend(_read_jsonl(file, text_field, name=file.relative_to(root).as_posix()))
        elif text := _read_text(file):
            docs.append(Document(file.relative_to(root).as_posix(), text))
    return docs


def build_corpus(sources: Optional[Sequence[str]] = None, heldout_fraction: float = 0.05,
                 max_chars: Optional[int] = None, text_field: str = "text",
                 require_heldout: bool = False) -> Corpus:
    """Read ``sources`` (default: the standard library) and split them by document-name hash.

    ``max_chars`` keeps a deterministic subset of the training documents (in
    hash order) whose text adds up to at most that many characters: a knob for
    quick runs. Raises ``ValueError`` when nothing is left to train on, and with
    ``require_heldout`` when no document's hash falls in the held-out split
    (otherwise a tiny corpus holds out its last training document instead).
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    if sources:
        docs = [doc for source in sources for doc in read_source(source, text_field)]
        names = list(sources)
    else:
        docs = stdlib_documents()
        names = [f"Python {sysconfig.get_python_version()} standard library ({stdlib_dir()})"]
    ranked = sorted(docs, key=lambda d: _hash01(d.name))
    heldout = [d for d in ranked if _hash01(d.name) < heldout_fraction]
    train = [d for d in ranked if _hash01(d.name) >= heldout_fraction]
    if max_chars is not None:
        kept, total = [], 0
        for doc in train:
            if total + len(doc.text) <= max_chars:
                kept.append(doc)
                total += len(doc.text)
        train = kept
    if not train:
        raise ValueError(f"sources={list(sources) if sources else 'stdlib'} gave an empty training corpus "
                         f"({len(docs)} documents read, max_chars={max_chars}); expected at least one "
                         "non-empty text document")
    if not heldout and require_heldout:
        raise ValueError(f"sources={list(sources) if sources else 'stdlib'} gave no held-out document "
                         f"({len(docs)} documents, heldout_fraction={heldout_fraction}); expected at least one "
                         "file whose name hashes into the held-out split: add files or raise heldout_fraction")
    if not heldout:  # tiny corpora: hold out the last document in hash order rather than nothing
        heldout = [train.pop()] if len(train) > 1 else list(train)
    return Corpus(train=train, heldout=heldout, sources=names)


def _hash01(name: str) -> float:
    """A stable number in [0, 1) from a document name (same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0 ** 64


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def _read_jsonl(path: Path, text_field: str, name: Optional[str] = None) -> list[Document]:
    """One document per non-empty line; split keys ``"<name>:<line>"`` (``name`` defaults to the file name)."""
    name = name or path.name
    docs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err}); expected one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}:{number} must be an object with a string field text_field="
                                 f"{text_field!r}, got keys {sorted(record) if isinstance(record, dict) else record!r}")
            if record[text_field]:
                docs.append(Document(f"{name}:{number}", record[text_field]))
    return docs


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> TextTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer) with ``<|endoftext|>`` and ``<|mask|>``.

    The two special tokens take ids 0 and 1, so the mask id is fixed and never
    produced by encoding ordinary text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_int("vocab_size", vocab_size, 300, note=" (256 bytes + merges + specials)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, MASK_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tokenizer)


# ----------------------------------------------------------------------------
# Packing and batching
# ----------------------------------------------------------------------------


@dataclass
class PackedData:
    """Fixed-length rows ``tokens [N, S]`` and the document id of every token (``-1`` = padding)."""

    tokens: torch.Tensor
    doc_ids: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> PackedData:
    """Concatenate documents, each followed by ``eos_id``, and cut into rows of ``seq_len``.

    The last row is padded (token ``eos_id``, document id ``-1``) so no text is
    lost; rows are not aligned to documents (a document may span rows).
    """
    check_int("seq_len", seq_len, 2)
    stream, docs = [], []
    for doc_id, ids in enumerate(token_lists):
        if len(ids):
            stream.extend(ids)
            stream.append(eos_id)
            docs.extend([doc_id] * (len(ids) + 1))
    if not stream:
        raise ValueError("token_lists must hold at least one non-empty document, got none")
    pad = -len(stream) % seq_len
    tokens = torch.tensor(stream + [eos_id] * pad, dtype=torch.long).view(-1, seq_len)
    doc_ids = torch.tensor(docs + [PAD_DOC_ID] * pad, dtype=torch.long).view(-1, seq_len)
    return PackedData(tokens, doc_ids)


class BatchSampler:
    """Seeded per-epoch shuffling of row indices with a resumable position.

    ``next_rows(n)`` returns the next ``n`` row indices, crossing into the next
    epoch (a fresh permutation) as needed. The state is two integers, so saving
    and restoring it continues the exact same sequence of rows.
    """

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self.cursor = 0, 0
        self._cached: tuple[int, torch.Tensor] = (-1, torch.empty(0, dtype=torch.long))

    def _order(self) -> torch.Tensor:
        """This epoch's permutation, computed once per epoch (not once per batch)."""
        if self._cached[0] != self.epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._cached = (self.epoch, torch.randperm(self.num_rows, generator=gen))
        return self._cached[1]

    def next_rows(self, count: int) -> torch.Tensor:
        out = []
        while count > 0:
            order = self._order()
            take = min(count, self.num_rows - self.cursor)
            out.append(order[self.cursor:self.cursor + take])
            self.cursor += take
            count -= take
            if self.cursor == self.num_rows:
                self.epoch, self.cursor = self.epoch + 1, 0
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise ValueError(f"data state is for num_rows={state['num_rows']}, seed={state['seed']}, but the "
                             f"data now has num_rows={self.num_rows}, seed={self.seed}: resume with the same data")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


def unigram_cross_entropy(train: PackedData, heldout: PackedData, vocab_size: int) -> float:
    """Held-out next-token cross-entropy (nats) of an add-one unigram model fit on ``train``.

    The baseline a trained model's AR loss must beat: it knows token frequencies
    and nothing about context. Counts only non-padding tokens.
    """
    counts = torch.bincount(train.tokens[train.doc_ids != PAD_DOC_ID], minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = heldout.tokens[:, 1:][(heldout.doc_ids[:, 1:] == heldout.doc_ids[:, :-1])
                                     & (heldout.doc_ids[:, 1:] != PAD_DOC_ID)]
    return float(-logp[targets].mean())


def held_out_prompts(heldout_ids: list, prompt_len: int, count: int) -> list:
    """``count`` prompts of ``prompt_len`` tokens from the middle of held-out documents.

    The middle, not the start: file headers (licences, module docstrings) are
    the least code-like part of a file. One prompt per document, longest first.
    """
    docs = sorted((ids for ids in heldout_ids if len(ids) >= 2 * prompt_len), key=len, reverse=True)
    return [ids[len(ids) // 2 - prompt_len // 2:][:prompt_len] for ids in docs[:count]]

