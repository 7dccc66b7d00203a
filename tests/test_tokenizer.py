"""The GPT-2 tokenizer loads offline from sha256-checked local files, and fails with one clear line otherwise."""
import shutil

import pytest
import tiktoken

from posenc import tokenizer
from posenc.tokenizer import EOT, get_tokenizer, tokenizer_info


@pytest.fixture
def no_download(monkeypatch):
    """Make tiktoken's network/cache path fail, so only the local files can satisfy get_tokenizer."""
    def refuse(name):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(tiktoken, "get_encoding", refuse)


def test_loads_offline_and_round_trips(no_download):
    enc = get_tokenizer()
    assert tokenizer.find_tokenizer_dir() is not None
    assert enc.name == "gpt2" and enc.n_vocab == 50257
    assert enc.encode_ordinary("hello world") == [31373, 995]  # GPT-2's published ids
    text = "def f(x):\n    return x ** 2  # naïve café, 日本語 🙂\n"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_eot_id():
    enc = get_tokenizer()
    assert EOT == 50256 == enc.eot_token
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert EOT not in enc.encode_ordinary("<|endoftext|>")  # ordinary text never produces the separator


def test_env_dir_is_used(tmp_path, monkeypatch, no_download):
    for name in tokenizer.SHA256:
        shutil.copy(tokenizer.find_tokenizer_dir() / name, tmp_path / name)
    monkeypatch.setenv("POSENC_TOKENIZER_DIR", str(tmp_path))
    assert tokenizer_info()["source"] == str(tmp_path)
    assert get_tokenizer().encode_ordinary("hello world") == [31373, 995]


def test_wrong_hash_is_a_clear_error(tmp_path, monkeypatch):
    for name in tokenizer.SHA256:
        shutil.copy(tokenizer.find_tokenizer_dir() / name, tmp_path / name)
    with open(tmp_path / "vocab.bpe", "ab") as f:
        f.write(b"x")  # one extra byte
    monkeypatch.setenv("POSENC_TOKENIZER_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"vocab\.bpe has sha256 .* expected 1ce1664773c5"):
        get_tokenizer()


def test_no_files_anywhere_names_what_is_needed(monkeypatch, no_download):
    monkeypatch.setattr(tokenizer, "find_tokenizer_dir", lambda: None)
    tokenizer._load.cache_clear()  # a cached success for "no folder" would hide the error
    try:
        with pytest.raises(RuntimeError, match=r"vocab\.bpe and encoder\.json .*POSENC_TOKENIZER_DIR"):
            get_tokenizer()
    finally:
        tokenizer._load.cache_clear()
