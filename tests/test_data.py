"""prepare.py writes a deterministic, document-split corpus; posenc/data.py reads it and samples resumable windows."""
import hashlib
import json

import numpy as np
import pytest
import torch

from data.prepare import DataError, is_val, main, prepare
from posenc.data import BatchSampler, data_identity, load_meta, load_split, long_documents
from posenc.tokenizer import EOT, get_tokenizer


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))  # about 2-3 tokens a word, no EOT


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of UTF-8 files in nested folders, one non-UTF-8 file, one empty file, one hidden folder."""
    root = tmp_path_factory.mktemp("corpus")
    texts = {f"doc{i:02d}.txt": words(20 + 5 * i, f"w{i}_") for i in range(12)}
    texts |= {"sub/notes.md": "# Title\n\nSome *markdown*.\n", "sub/deeper/code.py": "def f():\n    return 1\n",
              "sub/deeper/long.rst": words(400, "long"), "longer.txt": words(900, "longer")}
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "latin1.txt").write_bytes("café crème".encode("latin-1"))  # not UTF-8: skipped and counted
    (root / "empty.txt").write_text("")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # hidden folders are not documents
    return root, texts


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare(str(corpus[0]), out, val_fraction=0.3, quiet=True)


def test_prepare_is_deterministic(corpus, prepared, tmp_path):
    out, meta = prepared
    meta2 = prepare(str(corpus[0]), tmp_path, val_fraction=0.3, quiet=True)
    assert meta2["sha256"] == meta["sha256"]
    for split in ("train", "val"):
        assert (tmp_path / f"{split}.bin").read_bytes() == (out / f"{split}.bin").read_bytes()
        assert hashlib.sha256((out / f"{split}.bin").read_bytes()).hexdigest() == meta["sha256"][split]


def test_documents_split_whole_and_bounded_by_eot(corpus, prepared):
    out, meta = prepared
    root, texts = corpus
    enc = get_tokenizer()
    assert meta["n_files_skipped"] == 1 and meta["skipped_files"] == ["latin1.txt"]
    assert meta["n_files_empty"] == 1
    seen = {}
    for split in ("train", "val"):
        data = load_split(out, split)
        assert len(data) == meta["tokens"][split] == sum(n + 1 for _, n, _ in meta["docs"][split])
        assert meta["n_docs"][split] == len(meta["docs"][split]) > 0
        next_start = 0
        for start, length, rel in meta["docs"][split]:
            assert start == next_start  # documents are packed back to back, in sorted order
            assert data[start + length] == EOT and EOT not in data[start:start + length]
            assert enc.decode(data[start:start + length].tolist()) == texts[rel]  # whole file, never split
            assert is_val(rel, 0.3) == (split == "val")  # split by a hash of the path
            seen[rel] = split
            next_start = start + length + 1
    assert sorted(seen) == sorted(texts)  # each document exactly once
    assert [d[2] for d in meta["docs"]["train"]] == sorted(d[2] for d in meta["docs"]["train"])


def test_max_tokens_keeps_a_prefix_of_documents(corpus, tmp_path):
    meta = prepare(str(corpus[0]), tmp_path, val_fraction=0.3, max_tokens=300, quiet=True)
    docs = sorted(meta["docs"]["train"] + meta["docs"]["val"], key=lambda d: d[2])
    total = sum(n + 1 for _, n, _ in docs)
    assert total >= 300 and total - (docs[-1][1] + 1) < 300  # stopped right after reaching the cap
    assert [d[2] for d in docs] == sorted(corpus[1])[:len(docs)]


def test_glob_and_single_file_sources(corpus, tmp_path):
    root = corpus[0]
    meta = prepare(str(root / "**" / "*.rst"), tmp_path / "g", val_fraction=0.0, quiet=True)
    assert [d[2] for d in meta["docs"]["train"]] == ["sub/deeper/long.rst"]
    meta = prepare(str(root / "longer.txt"), tmp_path / "f", val_fraction=0.0, quiet=True)
    assert [d[2] for d in meta["docs"]["train"]] == ["longer.txt"] and meta["n_docs"]["val"] == 0


def test_prepare_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="no file, folder or glob match"):
        prepare(str(tmp_path / "missing"), tmp_path / "out", quiet=True)
    with pytest.raises(DataError, match="empty"):
        prepare("", tmp_path / "out", quiet=True)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.dat").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match=r"no UTF-8 text documents .*1 files skipped"):
        prepare(str(tmp_path / "only"), tmp_path / "out", quiet=True)
    with pytest.raises(SystemExit, match="prepare.py: no file, folder or glob match"):  # the CLI: one line
        main([f"--source={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'out'}"])


def test_load_errors_name_the_fix(prepared, tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match=rf"no prepared data at {missing}: run `python -m data.prepare --out_dir={missing}`"):
        load_meta(missing)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_split(prepared[0], "test")
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (bad / name).write_bytes((prepared[0] / name).read_bytes())
    with open(bad / "train.bin", "ab") as f:
        f.write(b"\x00\x00")  # one token too many
    with pytest.raises(ValueError, match="corrupt or mismatched data"):
        load_split(bad, "train")


def test_long_documents_and_identity(prepared):
    out, meta = prepared
    docs = long_documents(out, "train", 500) + long_documents(out, "val", 500)
    lengths = sorted(n for split in ("train", "val") for _, n, _ in meta["docs"][split] if n >= 500)
    assert sorted(len(d) for d in docs) == lengths and len(lengths) >= 2
    assert all(d.dtype == np.int64 and EOT not in d for d in docs)
    ident = data_identity(out)
    assert ident["sha256"] == meta["sha256"] and ident["tokens"] == meta["tokens"]


def test_sampler_windows_are_shifted_slices(prepared):
    out, _ = prepared
    data = load_split(out, "train")
    x, y = BatchSampler(out, "train", batch_size=8, block_size=16, seed=1).next()
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = data.astype(np.int64).tobytes()
    assert all(torch.cat([x[b], y[b, -1:]]).numpy().tobytes() in stream for b in range(8))


def test_sampler_exact_resume(prepared):
    out, _ = prepared
    s = BatchSampler(out, "train", batch_size=4, block_size=16, seed=3)
    for _ in range(5):
        s.next()
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON/checkpoint round trip
    expected = [s.next() for _ in range(4)]
    resumed = BatchSampler(out, "train", batch_size=4, block_size=16, seed=999)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, [resumed.next() for _ in range(4)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_sampler_ranks_differ_and_resume_from_rank0_state(prepared):
    out, _ = prepared
    r0 = BatchSampler(out, "train", 4, 16, seed=3, rank=0, world_size=2)
    r1 = BatchSampler(out, "train", 4, 16, seed=3, rank=1, world_size=2)
    assert not torch.equal(r0.next()[0], r1.next()[0])
    expected = r1.next()[0]
    r1b = BatchSampler(out, "train", 4, 16, seed=3, rank=1, world_size=2)
    r1b.load_state_dict({**r0.state_dict()})  # DDP checkpoints save rank 0's state only
    assert torch.equal(r1b.next()[0], expected)


def test_min_doc_len_windows_lie_inside_long_documents(prepared):
    out, meta = prepared
    data = load_split(out, "train").astype(np.int64)
    long = [(s, n) for s, n, _ in meta["docs"]["train"] if n >= 500]
    s = BatchSampler(out, "train", batch_size=64, block_size=32, seed=0, min_doc_len=500)
    assert s.n_long_docs == len(long) >= 1
    inside = b"".join(data[st:st + n].tobytes() + b"|" for st, n in long)  # "|" can't be inside a window
    for _ in range(5):
        x, y = s.next()
        for b in range(64):
            assert torch.cat([x[b], y[b, -1:]]).numpy().tobytes() in inside


def test_min_doc_len_weights_documents_by_windows(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.txt").write_text(words(200, "a"))
    (root / "b.txt").write_text(words(800, "b"))
    meta = prepare(str(root), tmp_path / "out", val_fraction=0.0, quiet=True)
    (sa, na, _), (sb, nb, _) = meta["docs"]["train"]
    doc_a = load_split(tmp_path / "out", "train")[sa:sa + na].astype(np.int64).tobytes()
    x, y = BatchSampler(tmp_path / "out", "train", batch_size=2000, block_size=16, seed=0, min_doc_len=100).next()
    w = torch.cat([x, y[:, -1:]], dim=1).numpy()
    frac_a = np.mean([row.tobytes() in doc_a for row in w])
    assert abs(frac_a - (na - 16) / (na - 16 + nb - 16)) < 0.03  # about 1 in 5, not 1 in 2


def test_min_doc_len_without_long_docs_warns_and_falls_back(prepared):
    with pytest.warns(UserWarning, match="no train documents of >= 100000 tokens"):
        s = BatchSampler(prepared[0], "train", batch_size=2, block_size=8, min_doc_len=100000)
    assert s.n_long_docs == 0 and s.next()[0].shape == (2, 8)


def test_too_small_corpus_is_a_clear_error(prepared):
    n = load_meta(prepared[0])["tokens"]["val"]
    with pytest.raises(ValueError, match=rf"has {n} tokens, too few for block_size={n}"):
        BatchSampler(prepared[0], "val", batch_size=2, block_size=n)


def test_compact_vocabulary_keeps_frequent_tokens_and_round_trips(corpus, prepared, tmp_path):
    from posenc.tokenizer import tokenizer_for

    meta = prepare(str(corpus[0]), tmp_path, val_fraction=0.3, vocab_size=64, quiet=True)
    vocab = meta["vocab"]
    assert meta["vocab_size"] == 64 and len(vocab["ids"]) == 63 and EOT in vocab["ids"]
    tok = tokenizer_for(vocab)
    for split in ("train", "val"):
        compact, original = load_split(tmp_path, split), load_split(prepared[0], split)
        assert compact.max() < 64 and len(compact) == len(original)
        kept = np.isin(original, vocab["ids"])
        assert (compact[~kept] == vocab["unk"]).all()  # rare tokens -> <unk>, everything else maps back
        assert (np.asarray(vocab["ids"])[compact[kept]] == original[kept]).all()
        start, length, _ = meta["docs"][split][0]
        assert compact[start + length] == tok.eot_token
    counts = np.bincount(load_split(prepared[0], "train"), minlength=EOT + 1)
    dropped = np.setdiff1d(np.nonzero(counts)[0], vocab["ids"])
    kept_counts = counts[[i for i in vocab["ids"] if i != EOT]]
    assert counts[dropped].max() <= kept_counts.min()  # the most frequent train tokens are the ones kept
    ids = [t for t in load_split(tmp_path, "train")[:60].tolist() if t != vocab["unk"]]
    assert tok.decode(ids) == get_tokenizer().decode([vocab["ids"][t] for t in ids])  # decode maps back
    assert tok.decode([vocab["unk"]]) == tok.UNK_TEXT


def test_folder_documents_pack_whole_files_of_one_folder(corpus, tmp_path):
    """--documents=folders: each document is one folder's own files (not its subfolders'), each after a
    `# file:` line, in sorted order, packed up to max_doc_tokens without splitting a file."""
    root, texts = corpus
    enc = get_tokenizer()
    cap = 1200  # longer.txt alone is ~2k tokens: a document of its own; the doc*.txt files pack in twos and threes
    meta = prepare(str(root), tmp_path, val_fraction=0.3, documents="folders", max_doc_tokens=cap, quiet=True)
    assert meta["source"]["documents"] == "folders" and meta["source"]["max_doc_tokens"] == cap
    files = texts | {"empty.txt": ""}  # an empty file is still a file of its folder
    text_of = {}
    for split in ("train", "val"):
        data = load_split(tmp_path, split)
        for start, n, name in meta["docs"][split]:
            assert is_val(name, 0.3) == (split == "val")  # the document's name decides its split
            text_of[name] = enc.decode(data[start:start + n].tolist())
    for folder in (".", "sub", "sub/deeper"):
        packs = sorted((name for name in text_of if name.rpartition("/")[0] == folder), key=lambda n: int(n[n.index("#") + 1:]))
        joined = "".join(text_of[name] for name in packs)
        own = sorted(rel for rel in files if (rel.rpartition("/")[0] or ".") == folder)
        expected = "".join(f"# file: {rel}\n{files[rel]}\n" for rel in own)
        assert joined == expected  # every file of the folder, whole, in order, and nothing from its subfolders
        for name in packs:
            n_tokens = len(enc.encode_ordinary(text_of[name]))
            assert n_tokens <= cap or text_of[name].count("# file: ") == 1  # over the cap only as a lone file
    assert len([n for n in text_of if n.startswith("./")]) > 2  # the cap did split the top folder
    assert meta["n_files_skipped"] == 1  # latin1.txt, as with files


def test_folder_documents_refuse_bad_options(corpus, tmp_path):
    with pytest.raises(DataError, match="documents must be one of files, folders"):
        prepare(str(corpus[0]), tmp_path, documents="packages", quiet=True)
    with pytest.raises(DataError, match="max_doc_tokens must be positive"):
        prepare(str(corpus[0]), tmp_path, documents="folders", max_doc_tokens=0, quiet=True)
