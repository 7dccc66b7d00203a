"""explain.md and its figures, from the numbers explain.py measured (explain.json). Each section opens with
sentences computed from those numbers, then its figure. Matplotlib is optional: without it the text stays."""

from pathlib import Path

import numpy as np

from posenc.run_folder import write_atomic

SHOWN_LAYERS = 4  # layers drawn in the attention panels (all of them in explain.json)


def _pct(x):
    return f"{100 * x:.0f}%"


def pair_ranges(indices):
    """[3, 4, 5, 9] -> '3–5, 9'."""
    out, start = [], None
    for a, b in zip([None] + indices, indices + [None]):
        if start is None:
            start = b
        elif b is None or b != a + 1:
            out.append(f"{start}–{a}" if a != start else f"{start}")
            start = b
    return ", ".join(out) or "none"


def angle_text(r):
    a, L, T = r["angles"], r["trained_len"], r["max_len"]
    own = a["own"]
    n = len(own["seen"])
    leave = [i for i, x in enumerate(own["leaves"]) if x]
    lines = [f"Trained at {L} tokens, {own['no_full_turn']} of {n} pairs never complete a turn within that length "
             f"(their wavelength exceeds {L}), so they saw only part of the circle. Up to {T} tokens, "
             + (f"pairs {pair_ranges(leave)} of {n} turn through angles they never reached in training."
                if leave else "no pair turns past the angles it reached in training.")]
    others = [(k, v) for k, v in a.items() if k != "own"]
    if others:
        lines.append("With each scaling applied to this model (training-free), pairs that still leave their "
                     "trained range at " + f"{T}: " + "; ".join(
                         f"{k} {sum(v['leaves'])} ({pair_ranges([i for i, x in enumerate(v['leaves']) if x])})"
                         for k, v in others) + ".")
    return lines


def decay_text(r):
    d, L, T = r["decay"], r["L"], r["max_len"]
    near = lambda curve, x: float(np.mean(curve[int(x / 2 ** 0.5):int(x * 2 ** 0.5) + 1]))  # noqa: E731  an octave
    pi = next((k for k in d if k == "PI"), None)
    return [f"RoFormer's bound on |q·k| falls with distance for this model's frequencies: on average "
            f"{near(d['own'], L):.2f} of its value at 0 around distance {L} (L) and {near(d['own'], T):.2f} around "
            f"{T} (means over an octave of distances; the bound oscillates)."
            + (f" With PI it is {near(d[pi], L):.2f} and {near(d[pi], T):.2f}: slower frequencies keep far keys "
               "heavier." if pi else "")]


def attention_text(r):
    att, L, T, trained = r["attention"], r["L"], r["max_len"], r["trained_len"]
    layers, bins, loss = att["layers"], att["bins"], att["loss"]
    out = [f"On {att['n_docs']} documents ({r['documents']})."]
    if T <= L:
        return out + [f"This explanation stops at L = {L}: every query sees only distances seen in training."]
    best = max(range(len(layers)), key=lambda i: layers[i]["far_share_past_L"])
    unseen = (f"distances this model saw only in its fine-tuning at {trained}" if trained > L
              else "distances never seen in training")
    out.append(f"Queries before position {L} cannot see a key at distance ≥ {L}, so their share there is 0. Past "
               f"{L}, the share of attention on keys farther than {L} ({unseen}) is "
               + ", ".join(f"{_pct(x['far_share_past_L'])} in layer {i}" for i, x in enumerate(layers))
               + f"; the most in layer {best}.")
    k = L // bins  # bins before L
    if k > 1:
        ent_b = [sum(x["entropy"][1:k]) / (k - 1) for x in layers]
        ent_p = [sum(x["entropy"][k:]) / len(x["entropy"][k:]) for x in layers]
        out.append("Attention entropy (nats) before L → past L: " + ", ".join(
            f"layer {i} {b:.2f} → {p:.2f}" for i, (b, p) in enumerate(zip(ent_b, ent_p))) + ".")
        before, past = sum(loss[1:k]) / (k - 1), sum(loss[k:]) / len(loss[k:])
        out.append(f"Loss on the same documents: {before:.3f} on average before L (past the first bin), "
                   f"{past:.3f} past it ({past - before:+.3f}).")
    return out


def write_explanation(r, out_dir) -> Path:
    out_dir = Path(out_dir)
    name = f"{r['pos_encoding']}" + (f" with {r['rope_scaling']}" if r["rope_scaling"] else "")
    md = [f"# Why it fails past L, and why a rescue works: {r['ckpt']}", "",
          f"Model: {name}; trained at L = {r['L']}" + (f", fine-tuned at {r['trained_len']}"
                                                       if r["trained_len"] != r["L"] else "")
          + f"; explained to {r['max_len']} tokens.", ""]
    figs = _plots(r, out_dir)
    md += ["## 1. Angle coverage", ""]
    if "angles" in r:
        md += angle_text(r) + ["", *figs.get("angles", [])]
    elif r["pos_encoding"] == "learned":
        md += [f"Learned positions are a table of {r['trained_len']} rows: there is no angle to extend, and "
               "the model cannot run past the table at all."]
    else:
        md += [f"{r['pos_encoding']} has no rotation angles: positions act through "
               + ("a bias on the logits that depends only on distance, the same at every length."
                  if "alibi_slopes" in r else "the causal mask alone.")]
    md += ["", "## 2. The shape of q·k over distance", ""]
    if "decay" in r:
        md += decay_text(r)
    if "alibi_slopes" in r:
        md += [f"ALiBi subtracts slope × distance from each logit: slopes {', '.join(f'{s:.4g}' for s in r['alibi_slopes'])}; "
               f"at distance {r['L']} the gentlest head's bias is {-r['alibi_slopes'][-1] * r['L']:.1f}."]
    md += ["", *figs.get("decay", []), "", "## 3. What the trained model does", ""]
    md += attention_text(r) + ["", *figs.get("attention", [])]
    path = out_dir / "explain.md"
    write_atomic(path, "\n".join(md) + "\n")
    return path


def _plots(r, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    L, T, figs = r["L"], r["max_len"], {}
    if "angles" in r:
        fig, ax = plt.subplots(figsize=(7, 4))
        own = r["angles"]["own"]
        pairs = range(len(own["seen"]))
        ax.plot(pairs, own["seen"], "k-", linewidth=2.5, label=f"largest angle seen in training ({r['trained_len']})")
        for k, v in r["angles"].items():
            ax.plot(pairs, v["reached"], "--" if k != "own" else "-", linewidth=1.2,
                    label=f"{'this model' if k == 'own' else k} at {T}")
        ax.axhline(2 * 3.141592653589793, color="gray", linewidth=1, linestyle=":")
        ax.annotate("one full turn (2π)", (0, 2 * 3.14159), xytext=(2, 3), textcoords="offset points", color="gray")
        ax.set(yscale="log", xlabel="rotary pair i (fast → slow)", ylabel="angle (radians, log)",
               title="Angles past the training length: above the black line = never seen")
        ax.legend(fontsize=7)
        figs["angles"] = [_save(fig, out_dir / "angles.png", plt)]
    if "decay" in r or "alibi_slopes" in r:
        fig, ax = plt.subplots(figsize=(7, 4))
        if "decay" in r:
            ds = r["decay"]["distances"]
            edges = sorted({int(e) for e in [1, *np.geomspace(2, len(ds), 40)]})  # log-spaced distance bins
            mids = [(lo * hi) ** 0.5 for lo, hi in zip(edges[:-1], edges[1:])]
            for k, v in r["decay"].items():
                if k != "distances":
                    binned = [float(np.mean(v[lo:hi])) for lo, hi in zip(edges[:-1], edges[1:])]
                    ax.plot(mids, binned, linewidth=2.2 if k == "own" else 1.2, linestyle="-" if k == "own" else "--",
                            label="this model" if k == "own" else k)
            ax.set(xscale="log", ylabel="RoFormer's bound on |q·k|, relative\n(mean over log-spaced distance bins)")
        else:
            ds = [1, T]
            for h, m in enumerate(r["alibi_slopes"]):
                ax.plot([1, T], [-m, -m * T], label=f"head {h}: slope {m:.3g}")
            ax.set(ylabel="ALiBi logit bias")
        ax.axvline(L, color="gray", linestyle="--", linewidth=1, label=f"L = {L}")
        ax.set(xlabel="relative distance (tokens)", title="How far a key can still weigh")
        ax.legend(fontsize=7)
        figs["decay"] = [_save(fig, out_dir / "decay.png", plt)]
    att = r["attention"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    edges, bins = att["edges"], att["bins"]
    mids = [((lo + 1) * hi) ** 0.5 for lo, hi in zip(edges[:-1], edges[1:])]
    xs = [(i + 0.5) * bins for i in range(len(att["loss"]))]
    shown = list(enumerate(att["layers"]))[:SHOWN_LAYERS]
    for i, lay in shown:
        line, = axes[0][0].plot(mids, lay["mass_before_L"], ":", linewidth=1)
        if lay["mass_past_L"]:
            axes[0][0].plot(mids, lay["mass_past_L"], "-", color=line.get_color(), label=f"layer {i}")
        axes[0][1].plot(xs, [100 * v for v in lay["far_share"]], label=f"layer {i}")
        axes[1][0].plot(xs, lay["entropy"], label=f"layer {i}")
    axes[1][1].plot(xs[1:], att["loss"][1:], "k-")
    axes[0][0].set(xscale="log", xlabel="key distance (tokens, buckets)", ylabel="attention mass",
                   title="Where attention goes: queries past L (solid), before L (dotted)")
    axes[0][1].set(xlabel="query position", ylabel=f"% of attention at distance ≥ {L}",
                   title=f"Attention on distances never seen at L = {L}")
    axes[1][0].set(xlabel="query position", ylabel="entropy (nats)", title="Attention entropy by position")
    axes[1][1].set(xlabel="token position", ylabel="loss (nats)", title="Loss by position (same documents)")
    for ax in (axes[0][1], axes[1][0], axes[1][1], axes[0][0]):
        ax.axvline(L, color="gray", linestyle="--", linewidth=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.text(0.5, 0.005, f"{att['n_docs']} documents; curves: means over documents and heads in bins of {bins} "
             "positions", ha="center", fontsize=9)
    figs["attention"] = [_save(fig, out_dir / "attention.png", plt)]
    return figs


def _save(fig, path, plt):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"![{path.stem}]({path.name})"
