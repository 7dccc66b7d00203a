"""Tokenize a corpus of text documents into train.bin / val.bin (uint16 GPT-2 tokens) and meta.json.

    python -m data.prepare                                  # this Python's standard library (.py files, tests included)
    python -m data.prepare --source=~/notes --out_dir=data/notes
    python -m data.prepare --source='docs/**/*.md' --max_tokens=1000000
    python -m data.prepare --source=pg19 --out_dir=data/pg19  # needs internet: books from PG19's train split

Every file is one document; documents are never split. A document goes to val when a stable hash (sha1) of its
relative path falls below --val_fraction, so adding files never reshuffles the others and evaluation on long
val documents stays comparable across runs. Each document is followed by one EOT token. Files that are not
UTF-8 text are skipped and counted. meta.json records each document's [start, length, relpath] (start is the
token offset in that split's .bin, length excludes the EOT) so posenc/data.py can sample windows inside long
documents and evaluate.py can pick documents of 16k or 32k tokens.
"""
import argparse
import glob
import hashlib
import itertools
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run by file path, the package beside data/ cannot be imported
    raise SystemExit("error: run it from the repository root as a module: python -m data.prepare [--flags]")
from posenc.tokenizer import EOT, get_tokenizer, tokenizer_info

DOCUMENT_UNITS = ("files", "folders")  # what one document is (prepare's `documents`)
FOLDER_DOC_TOKENS = 65536  # a folder's files are packed into documents of at most this many tokens
LONG_DOC_LENS = (16384, 32768)  # meta.json counts documents at least this long (the usual eval lengths)
PG19_LIST_URL = "https://storage.googleapis.com/storage/v1/b/deepmind-gutenberg/o"
PG19_FILE_URL = "https://storage.googleapis.com/deepmind-gutenberg/"


class DataError(ValueError):
    """A problem with the user's input; the command line prints it as one line."""


class Progress:
    """One self-overwriting stderr line on a terminal; a plain line every 10 s in logs."""

    def __init__(self, what: str, total: int, quiet: bool = False):
        self.what, self.total, self.quiet = what, total, quiet
        self.n = 0  # how many are done
        self.tty, self.t0, self.last = sys.stderr.isatty(), time.time(), 0.0

    def update(self, n: int, extra: str = "", final: bool = False):
        now = time.time()
        if self.quiet or (not final and now - self.last < (0.25 if self.tty else 10)):
            return
        self.last = now
        line = f"{self.what}: {n}/{self.total} {extra} [{now - self.t0:.0f}s]"
        print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


def _walk(root: Path, suffixes=None, skip_dirs=(), exclude: Path | None = None):
    """(relpath, path) of every file under root in sorted order; skips hidden folders, __pycache__ and skip_dirs."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__" and d not in skip_dirs
                             and (exclude is None or Path(dirpath, d).resolve() != exclude))
        for name in filenames:
            if suffixes is None or Path(name).suffix in suffixes:
                path = Path(dirpath, name)
                out.append((path.relative_to(root).as_posix(), path))
    return sorted(out)


def fetch_pg19(raw_dir: Path, n_books: int, timeout: float = 10.0) -> Path:
    """Download the first n_books of PG19's train/ split into raw_dir (kept, so later runs need no network)."""
    import urllib.parse
    import urllib.request

    raw_dir.mkdir(parents=True, exist_ok=True)
    manifest = raw_dir / "books.json"
    names = json.loads(manifest.read_text()) if manifest.exists() else []
    try:
        token = None
        while len(names) < n_books:  # the bucket lists names in sorted order, 1000 per page
            query = {"prefix": "train/", "fields": "items(name),nextPageToken", **({"pageToken": token} if token else {})}
            with urllib.request.urlopen(PG19_LIST_URL + "?" + urllib.parse.urlencode(query), timeout=timeout) as r:
                page = json.loads(r.read())
            names += [item["name"] for item in page.get("items", []) if item["name"].endswith(".txt")]
            token = page.get("nextPageToken")
            if not token:
                break
        names = sorted(set(names))[:n_books]
        for i, name in enumerate(names):
            path = raw_dir / name
            if not path.exists():
                with urllib.request.urlopen(PG19_FILE_URL + name, timeout=timeout) as r:
                    data = r.read()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            print(f"\rdownloading PG19: {i + 1}/{len(names)} books", end="", file=sys.stderr, flush=True)
    except OSError as e:  # URLError, timeouts and DNS failures are all OSErrors
        raise DataError(f"could not download PG19 from storage.googleapis.com ({e}): without internet use "
                        "--source=stdlib or a local folder/glob of text files") from None
    print(file=sys.stderr)
    manifest.write_text(json.dumps(names))
    return raw_dir


def list_documents(source: str, include_site_packages: bool = False, out_dir: Path | None = None,
                   pg19_books: int = 100) -> tuple[list[tuple[str, Path]], dict]:
    """Resolve --source into sorted (relpath, path) pairs and a description of the source for meta.json."""
    exclude = out_dir.resolve() if out_dir else None  # never read our own outputs back in
    if not source:
        raise DataError("--source is empty: give stdlib, pg19, a file, a folder or a glob")
    if source == "stdlib":
        paths = sysconfig.get_paths()
        root = Path(paths["stdlib"])
        files = _walk(root, {".py"}, skip_dirs={"site-packages", "dist-packages"}, exclude=exclude)
        if include_site_packages:  # prefixed, so they never collide with stdlib paths in the hash split
            files += [("site-packages/" + rel, p) for rel, p in _walk(Path(paths["purelib"]), {".py"}, exclude=exclude)]
        desc = {"kind": "stdlib", "path": str(root), "python": platform.python_version(),
                "include_site_packages": include_site_packages}
        return files, desc
    if source == "pg19":
        root = fetch_pg19(Path(out_dir or "data/pg19") / "raw", pg19_books)
        return _walk(root, {".txt"}), {"kind": "pg19", "path": str(root), "n_books": pg19_books}
    expanded = os.path.expanduser(source)
    if glob.has_magic(expanded):
        parts = Path(expanded).parts  # relpaths are taken from the folder before the first wildcard
        root = Path(*parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))] or ["."])
        matches = [Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p)]
        files = sorted((p.relative_to(root).as_posix(), p) for p in matches
                       if exclude is None or exclude not in p.resolve().parents)
        return files, {"kind": "glob", "pattern": source}
    path = Path(expanded)
    if path.is_file():
        return [(path.name, path)], {"kind": "file", "path": str(path.resolve())}
    if path.is_dir():
        return _walk(path, exclude=exclude), {"kind": "folder", "path": str(path.resolve())}
    raise DataError(f"no file, folder or glob match at {source!r}")


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (undecodable, or NUL bytes as in binaries)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: drop a byte-order mark rather than tokenize it
    except (UnicodeDecodeError, OSError):
        return None
    return None if "\x00" in text else text


def is_val(relpath: str, val_fraction: float) -> bool:
    """Stable split: the first 8 bytes of sha1(relpath) as a fraction of 2**64."""
    return int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:8], "big") < val_fraction * 2**64


def prepare(source: str = "stdlib", out_dir: str | Path = "data/stdlib", max_tokens: int | None = None,
            val_fraction: float = 0.1, include_site_packages: bool = False, pg19_books: int = 100,
            vocab_size: int | None = None, documents: str = "files", max_doc_tokens: int = FOLDER_DOC_TOKENS,
            batch_files: int = 64, quiet: bool = False) -> dict:
    """Tokenize `source` into `out_dir`/{train,val}.bin + meta.json and return the meta dict.

    max_tokens caps the total (EOTs included): documents are added in sorted order until it is reached.
    vocab_size keeps only that many ids (the train split's most frequent GPT-2 tokens, EOT and one <unk>):
    the CPU scale's small models would otherwise spend most of their compute on a 50k-row output layer.
    documents="folders" makes a document of each folder's files (see folder_documents) instead of each file.
    """
    t0, out_dir = time.time(), Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_tokens is not None and max_tokens <= 0:
        raise DataError(f"max_tokens must be positive, got {max_tokens}")
    if vocab_size is not None and not 2 < vocab_size <= EOT:
        raise DataError(f"vocab_size must be between 3 and {EOT} (or unset for GPT-2's full vocabulary), got {vocab_size}")
    if documents not in DOCUMENT_UNITS:
        raise DataError(f"documents must be one of {', '.join(DOCUMENT_UNITS)}, got {documents!r}")
    if max_doc_tokens <= 0:
        raise DataError(f"max_doc_tokens must be positive, got {max_doc_tokens}")
    files, desc = list_documents(source, include_site_packages, out_dir, pg19_books)
    if not files:
        raise DataError(f"no files found at {source!r}")
    if documents == "folders":  # each folder's files together, so that folder_documents can stream them
        files = sorted(files, key=lambda f: (f[0].rpartition("/")[0], f[0]))
        desc |= {"documents": "folders", "max_doc_tokens": max_doc_tokens}
    enc = get_tokenizer()
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = ("train", "val")
    outs = {s: open(out_dir / f"{s}.bin.tmp", "wb") for s in splits}  # renamed at the end: no half-written .bin
    sha = {s: hashlib.sha256() for s in splits}
    n_tok = {s: 0 for s in splits}
    docs = {s: [] for s in splits}
    skipped, n_empty, total = [], 0, 0
    progress = Progress("tokenizing", len(files), quiet)
    tokenized = tokenize_files(files, enc, batch_files, progress, lambda: max_tokens is not None and total >= max_tokens)
    if documents == "folders":
        tokenized = folder_documents(tokenized, enc, max_doc_tokens)
    for rel, tokens in tokenized:
        if max_tokens is not None and total >= max_tokens:
            break
        if tokens is None:
            skipped.append(rel)
            continue
        if not tokens:
            n_empty += 1
            continue
        split = "val" if is_val(rel, val_fraction) else "train"
        arr = np.array(tokens + [EOT], dtype=np.uint16)  # GPT-2 ids < 2**16
        outs[split].write(arr.tobytes())
        sha[split].update(arr.tobytes())
        docs[split].append([n_tok[split], len(tokens), rel])
        n_tok[split] += len(arr)
        total += len(arr)
    progress.update(progress.n, f"files, {total / 1e6:.1f}M tokens", final=True)
    for s in splits:
        outs[s].close()
        if total == 0:
            os.remove(out_dir / f"{s}.bin.tmp")
        else:
            os.replace(out_dir / f"{s}.bin.tmp", out_dir / f"{s}.bin")
    if total == 0:
        raise DataError(f"no UTF-8 text documents at {source!r} ({len(skipped)} files skipped as not UTF-8)")
    vocab = compact_vocab(out_dir, vocab_size, sha) if vocab_size else None

    meta = {
        "format_version": 1,
        "source": desc,
        "tokenizer": tokenizer_info(),
        "vocab_size": vocab["size"] if vocab else enc.n_vocab,
        "vocab": vocab,  # None: GPT-2 ids; else the compact vocabulary (tokenizer.tokenizer_for reads it)
        "dtype": "uint16",
        "val_fraction": val_fraction,
        "max_tokens": max_tokens,
        "tokens": n_tok,  # EOTs included: the length of each .bin
        "n_docs": {s: len(docs[s]) for s in splits},
        **{f"n_docs_ge_{n // 1024}k": {s: sum(d[1] >= n for d in docs[s]) for s in splits} for n in LONG_DOC_LENS},
        "sha256": {s: sha[s].hexdigest() for s in splits},
        "n_files_skipped": len(skipped),  # not UTF-8 text
        "skipped_files": skipped[:20],
        "n_files_empty": n_empty,
        "docs": docs,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    if not quiet:
        print_summary(meta, out_dir, time.time() - t0)
    return meta


def tokenize_files(files, enc, batch_files, progress, stop):
    """(relpath, tokens) of each file in order; tokens is None when the file is not UTF-8 text. stop() ends
    it early (--max_tokens reached) without tokenizing the files after."""
    for i in range(0, len(files), batch_files):
        if stop():
            return
        chunk = files[i:i + batch_files]
        texts = [read_text(path) for _, path in chunk]
        # tiktoken releases the GIL, so threads tokenize in parallel
        token_lists = iter(enc.encode_ordinary_batch([t for t in texts if t is not None],
                                                     num_threads=os.cpu_count() or 1))
        for (rel, _), text in zip(chunk, texts):
            yield rel, (None if text is None else next(token_lists))
        progress.n = i + len(chunk)
        progress.update(progress.n, "files")


def folder_documents(tokenized, enc, max_doc_tokens):
    """Documents of whole folders, as repository-level code corpora build them: a folder's files (not its
    subfolders'), in sorted order, each after a `# file: <relpath>` line, packed into documents of at most
    max_doc_tokens (a file is never split: one longer than that is a document alone). A document is named
    `<folder>/#<k>`, its k-th pack, and that name decides its split.

    Why: a file of the standard library is rarely 32k tokens long (4 held-out ones are), while its folders
    give hundreds of documents that long, each a coherent package whose files import and call each other.
    The cap keeps one huge folder (the test suite, ~3M tokens) from being one document, and so from landing
    in one split whole. Files that are not text pass through as (relpath, None) to be counted as skipped.
    """
    folder_of = lambda item: item[0].rpartition("/")[0] or "."  # noqa: E731
    for folder, items in itertools.groupby(tokenized, key=folder_of):  # prepare sorted the files by folder
        pack, k = [], 0
        for rel, tokens in items:
            if tokens is None:
                yield rel, None
                continue
            piece = enc.encode_ordinary(f"# file: {rel}\n") + tokens + enc.encode_ordinary("\n")
            if pack and len(pack) + len(piece) > max_doc_tokens:
                yield f"{folder}/#{k}", pack
                pack, k = [], k + 1
            pack += piece
        if pack:
            yield f"{folder}/#{k}", pack


def compact_vocab(out_dir: Path, vocab_size: int, sha: dict) -> dict:
    """Rewrite the .bin files in a vocabulary of `vocab_size` ids and return its description for meta.json.

    Kept: EOT and the vocab_size - 2 most frequent other tokens of the train split (ties broken by id), in
    GPT-2 id order; the last id is <unk>. Only train counts, so val stays held out.
    """
    counts = np.bincount(np.fromfile(out_dir / "train.bin", dtype=np.uint16), minlength=EOT + 1)
    counts[EOT] = -1  # EOT is always kept, and not among the vocab_size - 2 others
    order = np.lexsort((np.arange(counts.size), -counts))  # most frequent first, ties by id
    ids = np.sort(np.concatenate([order[: vocab_size - 2], [EOT]]))
    lut = np.full(counts.size, vocab_size - 1, dtype=np.uint16)  # everything else -> <unk>
    lut[ids] = np.arange(vocab_size - 1)
    for split in ("train", "val"):
        path = out_dir / f"{split}.bin"
        remapped = lut[np.fromfile(path, dtype=np.uint16)]
        remapped.tofile(f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
        sha[split] = hashlib.sha256(remapped.tobytes())
    kept = counts[ids[ids != EOT]].sum() / max(counts[counts > 0].sum(), 1)
    return {"size": vocab_size, "ids": ids.tolist(), "unk": vocab_size - 1, "eot": int(lut[EOT]),
            "train_coverage": round(float(kept), 6)}


def print_summary(meta: dict, out_dir: Path, seconds: float):
    src = meta["source"]
    print(f"prepared {out_dir} from {src['kind']} ({src.get('path', src.get('pattern'))}) in {seconds:.1f}s: "
          f"{sum(meta['n_docs'].values())} documents, {meta['n_files_skipped']} files skipped (not UTF-8)")
    for s in ("train", "val"):
        print(f"  {s:5s}: {meta['tokens'][s]:>11,} tokens, {meta['n_docs'][s]:>5} docs "
              f"(>=16k tokens: {meta['n_docs_ge_16k'][s]}, >=32k: {meta['n_docs_ge_32k'][s]})")
    if meta["vocab"]:
        v = meta["vocab"]
        print(f"  vocabulary: {v['size']} ids (the most frequent GPT-2 tokens + <unk>), "
              f"covering {v['train_coverage']:.2%} of train tokens")
    if 0 in meta["n_docs"].values():
        print("  warning: a split is empty: add files or change --val_fraction", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="stdlib", help="stdlib | pg19 | a file | a folder | a glob of UTF-8 text")
    p.add_argument("--out_dir", default="data/stdlib")
    p.add_argument("--max_tokens", type=int, default=None, help="stop adding documents once this many tokens")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--include_site_packages", action="store_true", help="with stdlib: add site-packages .py files")
    p.add_argument("--pg19_books", type=int, default=100, help="with pg19: how many books to download")
    p.add_argument("--documents", default="files", choices=DOCUMENT_UNITS,
                   help="one document per file, or per folder (its files packed up to --max_doc_tokens)")
    p.add_argument("--max_doc_tokens", type=int, default=FOLDER_DOC_TOKENS,
                   help="with --documents=folders: the most tokens one document holds")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="keep only this many token ids (most frequent + <unk>); small CPU models train faster")
    args = p.parse_args(argv)
    try:
        prepare(**vars(args))
    except DataError as e:
        sys.exit(f"prepare.py: {e}")


if __name__ == "__main__":
    main()
