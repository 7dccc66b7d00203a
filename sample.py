"""Sample from a trained checkpoint, streaming text as it comes (generation itself: posenc/generation.py).

    python sample.py --ckpt=out/cpu_rope/ckpt.pt --prompt="Once upon a time" --max_new_tokens=200
    python sample.py --ckpt=out/cpu_rope/ckpt.pt --prompt_file=long_document.txt --temperature=0
    cat notes.txt | python sample.py --ckpt=out/cpu_rope/ckpt.pt --prompt=- --top_p=0.9
    python sample.py --ckpt=out/cpu_rope/ckpt.pt --prompt_file=long_document.txt --self_extend=64,5  # Self-Extend

The prompt is prefilled in one forward (the fast attention kernels), then each new token goes through the
model's preallocated KV cache, one position at a time.
"""

import codecs
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from posenc.checkpoint import model_from_checkpoint
from posenc.cli import cli
from posenc.config import ConfigError, at_least, check_fields, parse
from posenc.generation import generate, to_inference_dtype
from posenc.positions import check_self_extend_flag, set_self_extend
from posenc.runtime import resolve_device, resolve_dtype
from posenc.tokenizer import tokenizer_for


@dataclass
class SampleConfig:
    ckpt: str = ""  # a checkpoint written by train.py or extend_context.py (required)
    prompt: str = "\n"  # prompt text, or - to read stdin
    prompt_file: str | None = None  # read the prompt from this UTF-8 file (long documents)
    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = 200  # sample among the k most likely tokens; None: all
    top_p: float | None = None  # nucleus sampling: the smallest set with this much probability
    seed: int = 1337
    device: str = "auto"  # auto: cuda, else mps, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False  # torch.compile the one-token decode step: compiled once (static shapes), then faster
    rope_scaling: dict | None = None  # run with this rope_scaling instead of the checkpoint's ({}: none)
    self_extend: tuple[int, ...] = ()  # W,G: Self-Extend (training-free): exact positions within W, grouped past it

    def __post_init__(self):
        check_fields(self)
        check_self_extend_flag(self.self_extend)
        at_least(self, 1, "num_samples", "max_new_tokens", "top_k")
        at_least(self, 0, "temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"bad value {self.top_p!r} for config key 'top_p': expected a number in (0, 1]")


def read_prompt(cfg):
    """The prompt text from --prompt, --prompt_file or stdin (--prompt=-); raise ValueError with one line."""
    if cfg.prompt_file is None and cfg.prompt != "-":
        source, text = "--prompt", cfg.prompt
    else:
        source = cfg.prompt_file or "stdin"
        try:
            data = Path(source).read_bytes() if cfg.prompt_file else sys.stdin.buffer.read()
        except OSError as e:
            raise ValueError(f"cannot read prompt file {source}: {e.strerror}") from None
        if b"\0" in data:
            raise ValueError(f"prompt file {source} looks binary (it has NUL bytes): give a UTF-8 text file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt file {source} is not UTF-8 text (bad byte at offset {e.start})") from None
    if not text:
        raise ValueError(f"empty prompt from {source}: give text with --prompt, --prompt_file or --prompt=- (stdin)")
    return text


def load(cfg):
    """(model, tokenizer, device) for a SampleConfig; ValueError/RuntimeError/OSError with one line."""
    if not cfg.ckpt:
        raise ConfigError("missing --ckpt: e.g. --ckpt=out/cpu_rope/ckpt.pt")
    device = resolve_device(cfg.device)
    model, ckpt = model_from_checkpoint(cfg.ckpt, device, override_scaling=cfg.rope_scaling)
    if cfg.self_extend:
        set_self_extend(model, *cfg.self_extend)
    dtype, why = resolve_dtype(cfg.dtype, device)
    print(f"{device}, {dtype} weights ({why}; --dtype to choose)", file=sys.stderr)
    model = to_inference_dtype(model, dtype)
    tokenizer = tokenizer_for((ckpt.get("data") or {}).get("vocab"))  # the vocabulary it was trained on
    return model, tokenizer, device


def main(argv=None):
    cfg = parse(SampleConfig, argv, doc=__doc__)
    text = read_prompt(cfg)
    model, enc, device = load(cfg)
    prompt = torch.tensor([enc.encode(text, allowed_special="all")], device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    n_new, t0 = 0, time.perf_counter()
    for i in range(cfg.num_samples):
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two tokens

        def stream(tok):
            nonlocal n_new
            n_new, t = n_new + 1, tok.item()
            sys.stdout.write(utf8.decode(enc.decode_single_token_bytes(t) if t < enc.n_vocab else b""))
            sys.stdout.flush()

        generate(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                 generator=generator, on_token=stream, compile=cfg.compile)
        sys.stdout.write(utf8.decode(b"", final=True) + ("\n---------------\n" if i + 1 < cfg.num_samples else "\n"))
    dt = time.perf_counter() - t0
    print(f"{n_new} tokens in {dt:.2f} s: {n_new / dt:.1f} tokens/s (prompt {prompt.size(1)} tokens, {device})",
          file=sys.stderr)


if __name__ == "__main__":
    cli(main)
