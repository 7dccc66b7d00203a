"""Published shapes of the wall and the rescue, to set our ratios beside (docs/references.md has them all).

A shape is perplexity at an evaluation length over perplexity at the training length L, for one scheme of
one paper. `nearest(paper_scheme, k)` gives the paper's ratio at the multiple of L nearest to k, so our
sliding-window perplexity at kL can be read against it.
"""

# Press et al. 2021 ("Train Short, Test Long"), appendix Tables 2 and 3: 247M models on WikiText-103,
# non-overlapping evaluation; perplexity at the evaluation lengths, the first being L (None: out of memory there).
PRESS = "Press et al. 2021, appendix Table {table} (247M, WikiText-103, trained at {L})"
WALL = {
    512: {"table": 2, "lengths": (512, 1012, 1512, 2512, 4512, 8512, 15512), "ppl": {
        "sinusoidal": (20.05, 43.54, 76.23, 132.41, 209.37, 305.65, 406.01),
        "rope": (20.07, 21.37, 25.99, 31.58, 39.15, 54.98, 79.25),
        "t5": (19.65, 18.79, 18.91, 20.41, 25.91, 43.08, None),
        "alibi": (19.73, 18.73, 18.52, 18.41, 18.41, 18.34, 18.31)}},
    1024: {"table": 3, "lengths": (1024, 2024, 3024, 5024, 8024, 16024), "ppl": {
        "sinusoidal": (19.34, 51.09, 96.46, 182.31, 284.88, 453.32),
        "rope": (19.33, 31.17, 35.67, 48.31, 64.91, 106.99),
        "t5": (18.80, 18.34, 18.62, 20.47, 25.79, None),
        "alibi": (18.66, 18.05, 17.92, 17.92, 17.96, 17.98)}},
}

# What the rescue papers report (perplexity; docs/references.md).
RESCUE = [
    ("Chen et al. 2023 (PI), LLaMA-7B 2k -> 8k, PG-19",
     "> 1000 past 2k without interpolation; with PI at 8k: 16.10 before fine-tuning, 7.12 after 200 steps, "
     "6.95 after 1000"),
    ("Peng et al. 2023 (YaRN), Llama-2-7B fine-tuned to 8k",
     "3.36 at 8k, 77.2 at 16k: the wall returns just past the fine-tuned length"),
]


def nearest(scheme: str, k: float) -> dict | None:
    """The published ratio ppl(~kL) / ppl(L) for a scheme, from the table whose evaluation length is nearest
    to k·L (ties: the shorter training length). None if no paper has the scheme."""
    best = None
    for L, t in WALL.items():
        if scheme not in t["ppl"]:
            continue
        ppl = t["ppl"][scheme]
        for n, p in zip(t["lengths"][1:], ppl[1:]):
            if p is None:
                continue
            gap = abs(n / L - k)
            if best is None or gap < best["gap"] - 1e-9:
                best = {"gap": gap, "multiple": n / L, "ratio": p / ppl[0], "length": n, "L": L,
                        "source": PRESS.format(table=t["table"], L=L)}
    return best
