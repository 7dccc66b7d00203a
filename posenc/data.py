"""Read the data that prepare.py wrote and sample (x, y) training windows from it.

The .bin files are memory-mapped, so a corpus larger than RAM costs nothing to open. meta.json's document
boundaries let the sampler keep windows inside long documents (for context-extension training) and let
evaluation pick whole long documents.
"""
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch


def _fix(data_dir) -> str:
    return f"run `python -m data.prepare --out_dir={data_dir}`"


def load_meta(data_dir) -> dict:
    """meta.json of a prepared folder; FileNotFoundError naming the command that creates it."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared data at {data_dir}: {_fix(data_dir)}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"corrupt or mismatched data: {path} is not valid JSON; {_fix(data_dir)}") from None


def load_split(data_dir, split: str) -> np.memmap:
    """The split's uint16 tokens (read-only memmap), checked against the token count in meta.json."""
    meta = load_meta(data_dir)
    if split not in meta["tokens"]:
        raise ValueError(f"unknown split {split!r}: {data_dir} has {', '.join(meta['tokens'])}")
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared data at {path}: {_fix(data_dir)}")
    n_bytes, expected = path.stat().st_size, meta["tokens"][split]
    if n_bytes != 2 * expected:  # a stale .bin from another run, or a truncated copy
        raise ValueError(f"corrupt or mismatched data: {path} holds {n_bytes / 2:g} tokens but meta.json says "
                         f"{expected}; {_fix(data_dir)}")
    if n_bytes == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def long_documents(data_dir, split: str, min_len: int) -> list[np.ndarray]:
    """Token arrays (int64, EOT excluded) of the split's documents with at least min_len tokens, in file order."""
    data, meta = load_split(data_dir, split), load_meta(data_dir)
    return [np.array(data[start:start + length], dtype=np.int64)
            for start, length, _ in meta["docs"][split] if length >= min_len]


def data_identity(data_dir) -> dict:
    """What a run saves to name its data: path, source, token counts, the .bin hashes from prepare time, the
    tokenizer and the vocabulary (None: GPT-2's own; else the compact vocabulary's GPT-2 ids)."""
    meta = load_meta(data_dir)
    for split in meta["tokens"]:
        load_split(data_dir, split)  # size check, so a run never records data it cannot read
    return {"path": str(Path(data_dir).resolve()), "source": meta["source"], "tokens": meta["tokens"],
            "sha256": meta["sha256"], "tokenizer": meta["tokenizer"]["name"], "vocab": meta.get("vocab"),
            "vocab_size": meta.get("vocab_size")}


def same_data(a: dict | None, b: dict | None) -> bool:
    """The same tokens, wherever the files lie (None: unknown, e.g. an old checkpoint: not a difference)."""
    keys = ("sha256", "tokenizer", "vocab")
    return a is None or b is None or all(a.get(k) == b.get(k) for k in keys)


def check_vocabulary(model_data: dict | None, data: dict, what: str) -> None:
    """ValueError (one line) if `data` is tokenized with another vocabulary than the model was trained on: the
    same ids would mean other tokens, and every number computed on it would be meaningless."""
    if model_data is None:
        return
    for key in ("tokenizer", "vocab"):
        if model_data.get(key) != data.get(key):
            size = lambda d: d.get("vocab_size") or (len(d["vocab"]["ids"]) + 1 if d.get("vocab") else "GPT-2's")  # noqa: E731
            raise ValueError(f"{what} was trained on another vocabulary ({size(model_data)} tokens) than the data at "
                             f"{data['path']} ({size(data)} tokens): use data prepared with the same --vocab_size")


class BatchSampler:
    """Random windows: x (B, T) and y (B, T) = x shifted by one token, as long tensors on `device`.

    Batch k is drawn by a torch.Generator seeded from (seed, rank, k), so the sampler's state is just k:
    resuming is exact, and under DDP every rank draws its own windows yet can resume from rank 0's saved state.
    With min_doc_len, each window lies inside one document of at least min_doc_len (and T + 1) tokens, every
    such window equally likely (so longer documents are drawn more often); otherwise windows start anywhere in
    the split and may cross document boundaries, as in nanoGPT.
    """

    def __init__(self, data_dir, split: str, batch_size: int, block_size: int, seed: int = 0, device="cpu",
                 min_doc_len: int | None = None, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.data = load_split(data_dir, split)
        self.split, self.batch_size, self.block_size, self.seed = split, batch_size, block_size, seed
        self.min_doc_len, self.rank, self.world_size = min_doc_len or None, rank, world_size
        self.device = torch.device(device)
        self.generator = torch.Generator()
        self.step = 0  # batches drawn so far
        T1 = block_size + 1  # a window holds x plus the one extra target token
        docs = []
        if self.min_doc_len:
            min_len = max(self.min_doc_len, T1)
            docs = [(start, length) for start, length, _ in load_meta(data_dir)["docs"][split] if length >= min_len]
            if not docs:
                warnings.warn(f"no {split} documents of >= {min_len} tokens in {data_dir}: "
                              f"sampling windows from the whole {split} stream instead")
        self.n_long_docs = len(docs)
        if not docs:
            if len(self.data) < T1:
                raise ValueError(f"the {split} split of {data_dir} has {len(self.data)} tokens, too few for "
                                 f"block_size={block_size} (needs {T1}): prepare more data or lower block_size")
            docs = [(0, len(self.data))]  # the whole split as one segment
        # window starts in segment i: start_i + [0, length_i - block_size); draw one of all of them uniformly
        self._seg_start = np.array([s for s, _ in docs], dtype=np.int64)
        n_windows = np.array([n for _, n in docs], dtype=np.int64) - block_size
        self._cum = np.cumsum(n_windows)
        self._cum_before = self._cum - n_windows

    def _batch_seed(self, step: int) -> int:
        # a hash mixes the three numbers, so (seed, rank) pairs never share streams the way seed + rank would
        digest = hashlib.sha256(f"{self.seed},{self.rank},{step}".encode()).digest()
        return int.from_bytes(digest[:8], "little")

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.generator.manual_seed(self._batch_seed(self.step))
        self.step += 1
        u = torch.randint(int(self._cum[-1]), (self.batch_size,), generator=self.generator).numpy()
        seg = np.searchsorted(self._cum, u, side="right")  # which segment each draw falls in
        starts = self._seg_start[seg] + (u - self._cum_before[seg])
        w = torch.from_numpy(np.stack([self.data[i:i + self.block_size + 1] for i in starts]).astype(np.int64))
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T) each
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "split": self.split, "batch_size": self.batch_size,
                "block_size": self.block_size, "min_doc_len": self.min_doc_len}

    def load_state_dict(self, sd: dict) -> None:
        """Continue the saved stream: the saved seed and step win; a different batch or window shape warns."""
        changed = [k for k in ("split", "batch_size", "block_size", "min_doc_len") if sd.get(k) != getattr(self, k)]
        if changed:
            warnings.warn(f"sampler state saved with different {', '.join(changed)}: batches will not repeat the "
                          "original run's")
        self.seed, self.step = sd["seed"], sd["step"]


EVAL_DOCS = 16  # evaluate.py's default count of long documents (the position and ppl tasks)


def n_long_documents(data_dir, split: str, min_len: int) -> int:
    """How many of the split's documents have at least min_len tokens (from meta.json: no tokens are read)."""
    return sum(length >= min_len for _, length, _ in load_meta(data_dir)["docs"][split])


def spread(docs: list, k: int) -> list:
    """k of docs, evenly spaced over them in file order (all of them when k = len(docs))."""
    return [docs[i * len(docs) // k] for i in range(k)]


def held_out_documents(data_dir, min_len, n_docs, train_docs=False):
    """(n_docs documents of >= min_len tokens spread over val, a note on where they came from). When val has
    fewer: a one-line ValueError, or with train_docs, train documents top them up and the note says so (they are
    not held out: a model trained on this corpus may have seen them)."""
    val = long_documents(data_dir, "val", min_len)
    if len(val) < n_docs and not train_docs:
        raise ValueError(f"{data_dir} has {len(val)} held-out (val) documents of >= {min_len} tokens, fewer than "
                         f"--n_docs={n_docs}: lower --n_docs or --max_len, or give --train_docs=true to top them up "
                         "with training documents (not held out)")
    docs = spread(val, min(n_docs, len(val)))
    note = f"{len(docs)} val documents of >= {min_len} tokens"
    if len(docs) < n_docs:
        train = long_documents(data_dir, "train", min_len)
        k = min(n_docs - len(docs), len(train))
        docs += spread(train, k)
        note += f" + {k} TRAIN documents (not held out: val has only {len(val)} that long)"
    if not docs:
        raise ValueError(f"no documents of >= {min_len} tokens in {data_dir}: lower --max_len or prepare a "
                         "corpus with longer documents")
    return docs, note
