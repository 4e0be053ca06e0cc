"""Data for the demo: an embedded corpus, a byte-level BPE tokenizer and token-block datasets.

Why these choices:

* The corpus is Python's own ``pydoc_data.topics`` (about 460 kB of English prose and code, the
  text behind ``help("for")``). It ships with every CPython, so the demo needs no download and no
  data set package, and runs on an air-gapped machine.
* The tokenizer is trained on that corpus on first use (a few seconds) and cached on disk, so no
  hub download is needed either. The cache file name carries the vocabulary size and a hash of the
  corpus: another Python version (different topics) or another size gets its own file instead of a
  stale one.
* Every rank of a job calls :func:`load_tokenizer` at the same moment. An exclusive file lock makes
  exactly one of them train while the others wait and then read the result; the file is written
  to a temporary name and atomically renamed, so a reader never sees half a file even where file
  locks are unavailable (there, each rank would train its own copy and the last rename wins).
* Samples are fixed-length blocks cut from the concatenated, ``<|endoftext|>``-separated documents
  (no padding, so every micro-batch has the same shape, which pipeline p2p likes). ``labels`` equal
  ``input_ids``: Hugging Face causal-LM heads shift them themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

try:  # POSIX; elsewhere the atomic rename alone keeps readers safe
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "EOS",
    "SEQ_LEN",
    "VOCAB_SIZE",
    "TokenBlocks",
    "build_datasets",
    "cache_dir",
    "corpus_documents",
    "ensure_tokenizer_file",
    "load_tokenizer",
    "tokenizer_path",
]

EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
SEQ_LEN = 128


def corpus_documents() -> list[str]:
    """The pydoc topics, one document per topic, in a fixed (sorted-key) order.

    Sorting makes the token stream, hence the train/eval split, identical on every rank and run.
    """
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def cache_dir() -> Path:
    """Where the trained tokenizer lives: ``$MERAK_CACHE`` or ``~/.cache/merak/demo``."""
    override = os.environ.get("MERAK_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "merak" / "demo"


def _corpus_digest(documents: Sequence[str]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        h.update(doc.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:12]


def tokenizer_path(directory: Path | None = None, vocab_size: int = VOCAB_SIZE) -> Path:
    """The cache file for this corpus and vocabulary size (see the module docstring)."""
    directory = cache_dir() if directory is None else directory
    return directory / f"bpe-{vocab_size}-{_corpus_digest(corpus_documents())}.json"


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (blocking), so one process trains at a time."""
    with open(lock_file, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _train_to(path: Path, vocab_size: int) -> None:
    """Train the byte-level BPE on the corpus and publish it at ``path`` by atomic rename."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_documents(), vocab_size=vocab_size, min_frequency=2,
                            show_progress=False, special_tokens=[EOS])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        bpe.save(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_tokenizer_file(directory: Path | None = None, vocab_size: int = VOCAB_SIZE) -> Path:
    """The trained tokenizer's file, training it first if no process has done so yet.

    Safe to call from many processes at once (see the module docstring).
    """
    path = tokenizer_path(directory, vocab_size)
    if path.exists():  # the common case: no lock needed to read a published file
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_suffix(".lock")):
        if not path.exists():  # another process may have trained it while we waited
            _train_to(path, vocab_size)
    return path


def load_tokenizer(directory: Path | None = None, vocab_size: int = VOCAB_SIZE):
    """The demo tokenizer as a ``transformers.PreTrainedTokenizerFast``.

    Wrapped for Hugging Face so ``generate`` / ``decode`` / ``save_pretrained`` work with it;
    ``<|endoftext|>`` serves as BOS, EOS, UNK and padding token, as in GPT-2.
    """
    from transformers import PreTrainedTokenizerFast

    path = ensure_tokenizer_file(directory, vocab_size)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)


class TokenBlocks(Dataset):
    """Fixed-length blocks of token ids; item ``i`` is ``{"input_ids", "labels"}`` (equal)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be [num_blocks, seq_len], got {tuple(blocks.shape)}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone()}


def build_datasets(tokenizer, seq_len: int = SEQ_LEN, eval_fraction: float = 0.05,
                   seed: int = 0) -> tuple[TokenBlocks, TokenBlocks]:
    """Train and eval :class:`TokenBlocks` from the whole corpus, split by a seeded shuffle.

    The split depends only on ``seed`` and the corpus, so every rank builds identical datasets
    without communicating.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    stream: list[int] = []
    for ids in tokenizer(corpus_documents(), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos_id)
    num_blocks = len(stream) // seq_len
    blocks = torch.tensor(stream[: num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    num_eval = max(1, round(num_blocks * eval_fraction))
    return TokenBlocks(blocks[order[num_eval:]]), TokenBlocks(blocks[order[:num_eval]])
