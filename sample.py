"""Sample from a trained checkpoint, streaming text as it comes; `generate` is importable.

    python sample.py --ckpt=out/run/ckpt.pt --prompt="Once upon a time" --max_new_tokens=200
    python sample.py --ckpt=out/run/ckpt.pt --prompt_file=long_document.txt --temperature=0
    cat notes.txt | python sample.py --ckpt=out/run/ckpt.pt --prompt=- --top_p=0.9

The prompt is prefilled in one forward (the fast attention kernels), then each new token goes through the
model's preallocated KV cache, one position at a time.
"""

import argparse
import codecs
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# Every decode step has a new key length, and cuDNN attention (SDPA's first choice on H100) builds a new
# plan per shape: ~12 ms of CPU per call. The flash and memory-efficient kernels have no such cost.
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top_k and outside the smallest set whose probability >= top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)


@torch.no_grad()
@sdpa_kernel(DECODE_BACKENDS)
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
             generator=None, stop_token=None, on_token=None):
    """Continue idx (B, T) by up to max_new_tokens; returns (B, T + new) with the prompt in front.

    use_cache=False recomputes the whole context at every step (the reference path, and the baseline of
    bench_decode.py). on_token(tok (B, 1)) is called as each token is chosen. Generation stops early
    once every row has produced stop_token.
    """
    B, T = idx.shape
    if T == 0:
        raise ValueError("empty prompt: give at least one token")
    total = T + max_new_tokens
    try:  # the scheme says up front if it cannot represent this many positions (learned: its table)
        model.transformer.pos.prepare(total, idx.device)
    except ValueError as e:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens: {e}") from None
    cache = model.make_kv_cache(B, total) if use_cache else None
    logits = model(idx, kv_cache=cache, last_only=True)[0][:, -1]  # prefill: one forward over the prompt
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        tok = next_token(logits, temperature, top_k, top_p, generator)
        idx = torch.cat((idx, tok), dim=1)
        if on_token is not None:
            on_token(tok)
        if stop_token is not None:
            done |= tok[:, 0] == stop_token
            if done.all():
                break
        if step + 1 < max_new_tokens:  # no forward for a token that will not be used
            logits = model(tok if use_cache else idx, kv_cache=cache, last_only=True)[0][:, -1]
    return idx


def read_prompt(args):
    """The prompt text from --prompt, --prompt_file or stdin (--prompt=-); raise ValueError with one line."""
    if args.prompt_file is None and args.prompt != "-":
        source, text = "--prompt", args.prompt
    else:
        source = args.prompt_file or "stdin"
        try:
            data = Path(source).read_bytes() if args.prompt_file else sys.stdin.buffer.read()
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


def pick_device(device):
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def pick_dtype(dtype, device):
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="out/run/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--prompt", default="\n", help="prompt text, or - to read stdin")
    p.add_argument("--prompt_file", default=None, help="read the prompt from this UTF-8 file (long documents)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off for long runs)")
    p.add_argument("--rope_scaling", default=None,
                   help="JSON rope_scaling dict to run with instead of the checkpoint's (positions.rope_frequencies)")
    return p.parse_args(argv)


def to_inference_dtype(model, dtype):
    """Cast weights to dtype but keep the position scheme in fp32: RoPE cos/sin in bf16 are a known
    long-context precision bug, and Module.to() casts buffers too."""
    model.to(dtype).transformer.pos.float()
    return model.eval()


def load(args):
    """(model, tokenizer, device) from the command line; ValueError/RuntimeError/OSError with one line."""
    scaling = json.loads(args.rope_scaling) if args.rope_scaling else None  # JSONDecodeError is a ValueError
    from tokenizer import tokenizer_for
    from train import model_from_checkpoint
    device = pick_device(args.device)
    model, ckpt = model_from_checkpoint(args.ckpt, device, override_scaling=scaling)
    model = to_inference_dtype(model, pick_dtype(args.dtype, device))
    tokenizer = tokenizer_for((ckpt.get("data") or {}).get("vocab"))  # the vocabulary it was trained on
    return (torch.compile(model, dynamic=True) if args.compile else model), tokenizer, device


def main(argv=None):
    args = parse_args(argv)
    try:
        text = read_prompt(args)
        model, enc, device = load(args)
    except (ValueError, RuntimeError, OSError) as e:
        sys.exit(f"error: {e}")
    prompt = torch.tensor([enc.encode(text, allowed_special="all")], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    n_new, t0 = 0, time.perf_counter()
    for i in range(args.num_samples):
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two tokens

        def stream(tok):
            nonlocal n_new
            n_new, t = n_new + 1, tok.item()
            sys.stdout.write(utf8.decode(enc.decode_single_token_bytes(t) if t < enc.n_vocab else b""))
            sys.stdout.flush()

        try:
            generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                     generator=generator, on_token=stream)
        except ValueError as e:  # e.g. a learned model asked past its position table
            sys.exit(f"error: {e}")
        sys.stdout.write(utf8.decode(b"", final=True) + ("\n---------------\n" if i + 1 < args.num_samples else "\n"))
    dt = time.perf_counter() - t0
    print(f"{n_new} tokens in {dt:.2f} s: {n_new / dt:.1f} tokens/s (prompt {prompt.size(1)} tokens, {device})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
