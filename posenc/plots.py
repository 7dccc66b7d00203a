"""Report pieces for evaluate.py: markdown tables and PNG plots from its results dict (or a results.json).

    from posenc.plots import results_markdown, plot_all
    results = json.load(open("out/eval/results.json"))
    print(results_markdown(results)); plot_all(results, "out/eval")

Matplotlib is optional: without it plot_all returns [] and the tables still carry every number. A model that
cannot run a length (learned positions past their table) shows "cannot run", never a gap without a reason.
"""

from pathlib import Path

from posenc.eval_tasks import PASSKEY_NEW_TOKENS, PPL_MODES, default_stride
from posenc.rope_scaling import length_dependent

CANNOT = "cannot run"
SPANS = {"random": "random tokens of the text: only copying predicts them", "text": "a slice of other text"}


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _cell(entry, fmt):
    return CANNOT if "cannot_run" in entry else fmt(entry)


def _reasons(results, task, entries):
    """One line per model that could not run part of a task, with the reason."""
    out = []
    for label, r in results["models"].items():
        reasons = {e["cannot_run"] for e in entries(r.get(task)) if "cannot_run" in e} if task in r else set()
        out += [f"- {label}: {CANNOT}: {reason}" for reason in sorted(reasons)]
    return out


def _multiple(n, L):
    return f"{n // L}L" if n % L == 0 else f"{n / L:g}L"


def seeds(results):
    """How many seeds a results dict merges (run_stats.merge_seeds); 1 for a plain evaluation."""
    return results.get("n_seeds", 1)


def _pm(e, key, digits, n_seeds, spread="std", signed=False):
    """'value ± spread': the standard deviation across seeds (<key>_sd) when several were merged, else the
    entry's own `spread` key if it has one (across documents)."""
    sd = e.get(f"{key}_sd") if n_seeds > 1 else e.get(spread)
    return f"{e[key]:{'+' if signed else ''}.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


WHOLE_WINDOW = "†"  # marks a model whose RoPE frequencies change with the length (dynamic NTK, LongRoPE)


def whole_window(models, labels):
    """The labels, those of length-dependent scalings marked, and the note that goes under their table: how their
    losses are scored (tests/test_evaluate.py, test_length_dependent_scaling_is_scored_with_the_whole_windows_...)."""
    marked = [k for k in labels if length_dependent(models[k].get("rope_scaling"))]
    names = [f"{k} {WHOLE_WINDOW}" if k in marked else k for k in labels]
    if not marked:
        return names, []
    return names, ["", f"{WHOLE_WINDOW} {', '.join(marked)}: the RoPE frequencies change with the length (dynamic NTK, "
                       "LongRoPE), and every token of a window is scored with the frequencies of the whole window, "
                       "tokens before L included: one forward per window, as transformers' forward without a cache. "
                       "transformers' cached generation scores the same text otherwise (each cached key keeps the "
                       "frequencies of the length at which it was cached), and so does a forward over each token's "
                       "own prefix."]


def fine_tuned_length(results):
    """The longest block_size among the models, if longer than L (the length extended models trained at)."""
    longest = max((m["block_size"] for m in results["models"].values()), default=0)
    return longest if longest > results["base_len"] else None


def results_markdown(results):
    """Markdown tables of every task in results, each saying how many documents / tokens / trials it rests on."""
    models, L, max_len = results["models"], results["base_len"], results["max_len"]
    labels = list(models)
    docs = results["documents"]
    out = ["# Long-context evaluation", "",
           "Models: " + ", ".join(f"{k} ({m['pos_encoding']}, block_size {m['block_size']}"
                                  + (f", {m['rope_scaling']}" if m["rope_scaling"] else "") + ")"
                                  for k, m in models.items()) + ".",
           f"Base (training) length L = {L}; max_len = {max_len}; data: {results['data_dir']}."]
    have = lambda task: [k for k in labels if task in models[k]]  # noqa: E731

    n_seeds = seeds(results)
    spread = f"std across {n_seeds} seeds" if n_seeds > 1 else "std across documents"
    if have("position"):
        ks = have("position")
        p0 = models[ks[0]]["position"]
        out += ["", "## Loss by position", "",
                f"Mean loss ± {spread}, per bucket of positions (position p predicts token p + 1 from "
                f"p + 1 tokens), on {docs['source']}: {p0['n_docs']} documents × {max_len} positions = "
                f"{p0['n_docs'] * max_len} tokens per model (fewer where it cannot run). Rows marked ▸ are at or "
                "past L.", ""]

        def position_table(task_entries, signed=False):
            rows = []
            for i, b in enumerate(p0["buckets"]):
                row = [f"{'▸ ' if b['lo'] >= L else ''}[{b['lo']}, {b['hi']})", p0["n_docs"] * (b["hi"] - b["lo"])]
                rows.append(row + [_cell(task_entries(models[k]["position"])[i],
                                         lambda e: _pm(e, "mean", 3, n_seeds, signed=signed)) for k in ks])
            return _table(["positions", "tokens"] + whole_window(models, ks)[0], rows)

        out += [position_table(lambda p: p["buckets"])]
        out += whole_window(models, ks)[1]
        out += _reasons(results, "position", lambda p: p["buckets"])
        ref = results.get("reference")
        if ref and all("relative" in models[k]["position"] for k in ks):
            out += ["", f"### Loss by position minus {ref}'s", "",
                    f"Each model's loss minus the loss of **{ref}** at the same positions of the same documents "
                    f"(mean ± {'std across seeds' if n_seeds > 1 else 'std across documents of the difference'}). "
                    "Loss falls with position for every model, since later tokens of a file are easier; the "
                    "difference cancels that fall, so a model that stops using positions right past L rises at L.",
                    ""]
            out += [position_table(lambda p: p["relative"], signed=True)]

    if have("ppl"):
        ks = have("ppl")
        wins = [e["window"] for e in models[ks[0]]["ppl"]]
        n = next((e for k in ks for e in models[k]["ppl"] if "n_tokens" in e), {})
        first = models[ks[0]]["ppl"]
        strides = {e["window"]: e.get("stride", default_stride(e["window"])) for e in first}
        title, how = PPL_MODES[ppl_mode_of(first)]
        out += ["", f"## {title}", "",
                f"{how[0].upper() + how[1:]}: every window size scores the same {n.get('n_tokens', '?')} tokens "
                f"of {n.get('n_docs', '?')} documents."
                + (f" Mean ± std across {n_seeds} seeds." if n_seeds > 1 else ""),
                ""]
        names, note = whole_window(models, ks)
        rows = [[name] + [_cell(e, lambda e: _pm(e, "ppl", 2, n_seeds, spread=None)) for e in models[k]["ppl"]]
                for name, k in zip(names, ks)]
        out += [_table(["model"] + [f"W={w} ({_multiple(w, L)}, S={strides[w]})" for w in wins], rows)]
        out += note
        out += _reasons(results, "ppl", lambda p: p)

    if have("short"):
        ks = have("short")
        ref = models[ks[0]]["short"]["loss"]
        s0 = models[ks[0]]["short"]
        out += ["", "## Short-context loss", "",
                f"Mean loss on windows of L = {s0['base_len']} tokens spread over the val split ({s0['n_tokens']} "
                f"tokens); Δ against {ks[0]}.", ""]
        rows = [[k, _pm(models[k]["short"], "loss", 4, n_seeds, spread=None),
                 _pm(models[k]["short"], "ppl", 2, n_seeds, spread=None), f"{models[k]['short']['loss'] - ref:+.4f}"]
                for k in ks]
        out += [_table(["model", "loss", "ppl", "Δ loss"], rows)]

    if have("passkey"):
        ks = have("passkey")
        pk = models[ks[0]]["passkey"]
        lens = [e["length"] for e in pk["by_length"]]
        out += ["", "## Passkey retrieval", "",
                f"Accuracy (%) by context length (prompt + {pk.get('max_new_tokens', PASSKEY_NEW_TOKENS)} generated tokens), greedy decoding; "
                f"{pk['trials'] * len(pk['depths'])} prompts per cell: {pk['trials']} random key(s) at each depth "
                f"{', '.join(f'{d:g}' for d in pk['depths'])}.", ""]
        rows = [[k] + [_cell(e, lambda e: f"{100 * e['accuracy']:.0f}"
                             + (f" ± {100 * e['accuracy_sd']:.0f}" if e.get("accuracy_sd") is not None else ""))
                       for e in models[k]["passkey"]["by_length"]] for k in ks]
        out += [_table(["model"] + [f"{n} ({_multiple(n, L)})" for n in lens], rows)]
        out += _reasons(results, "passkey", lambda p: p["by_length"])

    if have("recall"):
        ks = have("recall")
        rc = models[ks[0]]["recall"]
        ds = rc["by_distance"]
        n_probes = next((e["n_probes"] for e in ds if "n_probes" in e), "?")
        out += ["", "## Long-range recall", "",
                f"A span of {rc['span_len']} tokens ({SPANS.get(rc['kind'], rc['kind'])}) inside val text, repeated d "
                f"tokens later. Loss, first copy → second copy (greedy token accuracy, first → second); the first "
                f"token of each copy is not scored; {n_probes} probes per distance. Distances ≥ L = {L} were never "
                "seen in training.", ""]
        rows = [[k] + [_cell(e, lambda e: f"{e['first_copy_loss']:.2f} → {e['loss']:.2f} "
                                          f"({100 * e['first_copy_accuracy']:.0f}% → {100 * e['accuracy']:.0f}%)")
                       for e in models[k]["recall"]["by_distance"]] for k in ks]
        out += [_table(["model"] + [f"d={e['distance']}" for e in ds], rows)]
        out += _reasons(results, "recall", lambda p: p["by_distance"])
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- plots

def plot_all(results, out_dir):
    """Write the PNGs for the tasks present; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    tab20 = plt.get_cmap("tab20").colors
    palette = tab20[0::2] + tab20[1::2]  # 10 distinct colors, then their lighter twins: 20 models, none alike
    colors = {k: palette[i % len(palette)] for i, k in enumerate(results["models"])}  # the same in every panel
    for task, fn in (("position", _plot_position), ("ppl", _plot_ppl), ("passkey", _plot_passkey),
                     ("recall", _plot_recall)):
        ks = [k for k, r in results["models"].items() if task in r]
        if ks:
            fig = fn(plt, results, model_groups(results, ks), colors)
            paths.append(out_dir / f"{task}.png")
            fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
            plt.close(fig)
    return paths


PANEL_MODELS = 7  # lines per panel past which a reader can no longer tell them apart at a glance


def model_groups(results, ks):
    """The models ks in panels a reader compares at a glance: [(title, models)]. One untitled panel when they
    fit; else the models as trained, the RoPE scalings applied without training, and the models fine-tuned
    longer, each of the last two with the unscaled model of its scheme drawn again as the reference, and a group
    of more than PANEL_MODELS split."""
    if len(ks) <= PANEL_MODELS:
        return [("", ks)]
    models, L = results["models"], results["base_len"]
    tuned = [k for k in ks if models[k]["block_size"] > L]
    scaled = [k for k in ks if models[k].get("rope_scaling") and k not in tuned]
    trained = [k for k in ks if k not in tuned and k not in scaled]
    lengths = {models[k]["block_size"] for k in tuned}
    groups = [("as trained", trained, [])]
    for title, members in (("scaled, no fine-tune", scaled),
                           (f"fine-tuned at {_multiple(min(lengths), L)}" if len(lengths) == 1 else "fine-tuned longer",
                            tuned)):
        schemes = {models[k]["pos_encoding"] for k in members}
        groups.append((title, members, [k for k in trained if models[k]["pos_encoding"] in schemes]))
    panels = []
    for title, members, refs in groups:
        n = -(-len(members) // max(1, PANEL_MODELS - len(refs)))  # panels, filled evenly
        size = -(-len(members) // n) if n else 0
        panels += [(title + (f" ({i + 1}/{n})" if n > 1 else ""), refs + members[i * size:(i + 1) * size])
                   for i in range(n)]
    return panels


def _grid(plt, groups, n_panels, width, height):
    """axes[group][panel]: a row per group, its panels side by side; the y axis shared down each column."""
    return plt.subplots(len(groups), n_panels, figsize=(width * n_panels + 2.5, height * len(groups)), squeeze=False,
                        sharey="col", layout="constrained")


def _titled(fig, axes, groups, title, panel_titles=()):
    """The task's title above the figure, and above each panel its group and, for a task of several panels, what
    the panel shows. A figure of one panel carries the title alone."""
    if len(axes) * len(axes[0]) == 1:
        axes[0][0].set_title(title)
        return
    fig.suptitle(title)
    for (group, _), row in zip(groups, axes):
        for ax, what in zip(row, panel_titles or [None]):
            ax.set_title(": ".join(t for t in (group, what) if t), fontsize=10)


def _legend(row):
    row[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the row's lines, not over them


def _wall(ax, results, what="training length", labeled=True):
    """The training length L and, if a model was fine-tuned longer, that length, as vertical lines (in the legend
    if labeled: once per figure is enough)."""
    L, tuned = results["base_len"], fine_tuned_length(results)
    ax.axvline(L, color="gray", linestyle="--", linewidth=1, label=f"{what} L = {L}" if labeled else None)
    if tuned:
        ax.axvline(tuned, color="gray", linestyle=":", linewidth=1,
                   label=f"fine-tuned {what} {_multiple(tuned, L)}" if labeled else None)


def _band(ax, xs, ys, sds, color):
    ax.fill_between(xs, [y - s for y, s in zip(ys, sds)], [y + s for y, s in zip(ys, sds)], color=color, alpha=0.2)


def _lines(ax, results, ks, task, entries, x, y, colors, logx=True):
    """One line per model over its runnable entries; "cannot run" written where the line stops."""
    for i, k in enumerate(ks):
        es = entries(results["models"][k][task])
        ok = [e for e in es if "cannot_run" not in e]
        ax.plot([x(e) for e in ok], [y(e) for e in ok], marker="o", markersize=3, label=k, color=colors[k])
        if es and "cannot_run" in es[-1] and ok:  # the wall: say where the line stops
            ax.annotate(f"{k}: {CANNOT} past here →", (x(ok[-1]), y(ok[-1])), color=colors[k], fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        elif not ok:
            ax.annotate(f"{k}: {CANNOT}", (0.02, 0.95 - 0.06 * i), xycoords="axes fraction", color=colors[k],
                        fontsize=8)
    if logx:
        from matplotlib.ticker import FuncFormatter
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 256, not 2^8


def _plot_position(plt, results, groups, colors):
    ks = [k for _, g in groups for k in g]
    ref = results.get("reference")
    relative = ref and all("relative" in results["models"][k]["position"] for k in ks)
    fig, axes = _grid(plt, groups, 2 if relative else 1, 6.5, 4.5)
    center = lambda b: ((b["lo"] + 1) * b["hi"]) ** 0.5  # noqa: E731  geometric middle of the context sizes
    n_seeds, p0 = seeds(results), results["models"][ks[0]]["position"]
    band = f"± std across {n_seeds} seeds" if n_seeds > 1 else "± std error across documents"
    panels = [(lambda p: p["buckets"], "loss", "loss by position")]
    if relative:  # from L/8 on: the first buckets hold a few tokens each, and their noise would set the scale
        start = results["base_len"] // 8
        panels.append((lambda p: [b for b in p["relative"] if b["lo"] >= start], "loss − the reference's",
                       f"minus the loss of {ref} (from position {start})"))
    for (_, members), row in zip(groups, axes):
        for ax, (entries, ylabel, title) in zip(row, panels):
            _lines(ax, results, members, "position", entries, center, lambda b: b["mean"], colors)
            for k in members:
                ok = [b for b in entries(results["models"][k]["position"]) if "cannot_run" not in b]
                sds = [b.get("mean_sd") or 0.0 if n_seeds > 1 else b["std"] / p0["n_docs"] ** 0.5 for b in ok]
                _band(ax, [center(b) for b in ok], [b["mean"] for b in ok], sds, colors[k])
            _wall(ax, results, labeled=ax is axes[0][-1])
            if ax is not row[0]:
                ax.axhline(0, color="black", linewidth=0.5)
            ax.set(xlabel="token position (context size)", ylabel=ylabel)
        _legend(row)
    _titled(fig, axes, groups, f"Loss by position: {p0['n_docs']} documents of ≥ {results['max_len'] + 1} tokens "
                               f"(bands: {band})", [title for _, _, title in panels])
    return fig


def ppl_mode_of(entries):
    """The mode of a model's ppl entries: sliding if any window slides (a --stride of W or more leaves the shortest
    windows without overlap; the header's S per window tells which), and sliding for results from before the modes."""
    return "sliding" if any(e.get("mode", "sliding") == "sliding" for e in entries) else "nonoverlapping"


def _plot_ppl(plt, results, groups, colors):
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 30, not 3 x 10^1
    fig, axes = _grid(plt, groups, 1, 6, 3.5)
    for (_, members), (ax,) in zip(groups, axes):
        _lines(ax, results, members, "ppl", lambda p: p, lambda e: e["window"], lambda e: e["ppl"], colors)
        if seeds(results) > 1:
            for k in members:
                ok = [e for e in results["models"][k]["ppl"] if "cannot_run" not in e]
                _band(ax, [e["window"] for e in ok], [e["ppl"] for e in ok], [e.get("ppl_sd") or 0.0 for e in ok],
                      colors[k])
        _wall(ax, results, "window: training length", labeled=ax is axes[0][-1])
        ax.set(xlabel="window (tokens)", ylabel="perplexity (log scale)", yscale="log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        _legend([ax])
    _titled(fig, axes, groups, PPL_MODES[ppl_mode_of(results["models"][groups[0][1][0]]["ppl"])][0])
    return fig


def _plot_passkey(plt, results, groups, colors):
    fig, axes = _grid(plt, groups, 1, 6, 3.5)
    for (_, members), (ax,) in zip(groups, axes):
        _lines(ax, results, members, "passkey", lambda p: p["by_length"], lambda e: e["length"],
               lambda e: 100 * e["accuracy"], colors)
        _wall(ax, results, labeled=ax is axes[0][-1])
        ax.set(xlabel="context length (tokens)", ylabel="passkey accuracy (%)", ylim=(-5, 105))
        _legend([ax])
    _titled(fig, axes, groups, "Passkey retrieval")
    return fig


def _plot_recall(plt, results, groups, colors):
    fig, axes = _grid(plt, groups, 2, 5.5, 4)
    for (_, members), row in zip(groups, axes):
        for ax, y, y1, name in (
                (row[0], lambda e: e["loss"], lambda e: e["first_copy_loss"], "loss"),
                (row[1], lambda e: 100 * e["accuracy"], lambda e: 100 * e["first_copy_accuracy"],
                 "greedy accuracy (%)")):
            _lines(ax, results, members, "recall", lambda p: p["by_distance"], lambda e: e["distance"], y, colors)
            for k in members:  # dotted: the first copy, where there is nothing to copy
                ok = [e for e in results["models"][k]["recall"]["by_distance"] if "cannot_run" not in e]
                ax.plot([e["distance"] for e in ok], [y1(e) for e in ok], linestyle=":", color=colors[k])
            _wall(ax, results, "distance = training length", labeled=ax is axes[0][-1])
            ax.set(xlabel="distance d between the copies (tokens)", ylabel=f"{name} (dotted: first copy)")
        _legend(row)
    _titled(fig, axes, groups, f"Long-range recall ({results['models'][groups[0][1][0]]['recall']['span_len']}-token "
                                "span)", ["the second copy's loss", "the second copy's greedy accuracy"])
    return fig


# ----------------------------------------------------------------------------- the headline figure

def _relative_curve(models, k, ref):
    """(positions, mean loss minus the reference's at the same positions) of a model, without the first bin."""
    curve = models[k]["position"]["curve"][1:]  # the first bin (almost no context) is off any useful scale
    return ([(c["lo"] + c["hi"]) / 2 for c in curve],
            [c["mean"] - (ref[i + 1] if ref else 0.0) for i, c in enumerate(curve)], curve)


RESCUE_STYLE = dict(color="tab:blue", linewidth=2.2)
BASE_STYLE = dict(color="gray", linewidth=1.2)
BASELINE_STYLE = dict(color="tab:orange", linewidth=1.2)


def plot_rescues(results, path, base, baseline, rescues, reference=None, ncols=3):
    """Small multiples, one panel per rescue: its loss by position (thick) over the `base` model's (gray) and
    the `baseline` rescue's (orange), minus the `reference` model's when given, with L and the fine-tuned
    length marked; one y scale for all panels. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models, L, tuned = results["models"], results["base_len"], fine_tuned_length(results)
    rescues = [r for r in rescues if r in models]
    n_seeds = seeds(results)
    ref = [c["mean"] for c in models[reference]["position"]["curve"]] if reference else None
    nrows = -(-len(rescues) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.2 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    for ax, k in zip(axes.flat, rescues):
        for label, style in ((base, BASE_STYLE), (baseline, BASELINE_STYLE), (k, RESCUE_STYLE)):
            xs, ys, curve = _relative_curve(models, label, ref)
            line, = ax.plot(xs, ys, label=label, **style)
            if n_seeds > 1:
                _band(ax, xs, ys, [c.get("mean_sd") or 0.0 for c in curve], line.get_color())
        for x, style, text in ((L, "--", "L"), (tuned, ":", tuned and _multiple(tuned, L))):
            if x:
                ax.axvline(x, color="gray", linestyle=style, linewidth=1)
                ax.annotate(text, (x, 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                            textcoords="offset points", color="gray", fontsize=9)
        ax.set_title(k.removeprefix(f"{base} + "), fontsize=10)
        ax.set(xlim=(0, results["max_len"]))
    for ax in axes.flat[len(rescues):]:
        ax.axis("off")
    for col in range(ncols):  # the x axis under each column's lowest panel
        shown = [ax for ax in axes[:, col] if ax.axison]
        if shown:
            shown[-1].xaxis.set_tick_params(labelbottom=True)
            shown[-1].set_xlabel("token position")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"loss − {reference}'s (nats)" if reference else "loss (nats)")
    handles = [plt.Line2D([], [], **style) for style in (RESCUE_STYLE, BASE_STYLE, BASELINE_STYLE)]
    fig.legend(handles, ["the panel's rescue", base, baseline], loc="lower center", ncol=3, frameon=False,
               fontsize=9, bbox_to_anchor=(0.5, -0.04))
    pos0 = models[base]["position"]
    fig.suptitle(f"Every rescue of {base}, one per panel, against {base} and {baseline}", fontsize=11)
    fig.text(0.5, -0.09, f"Mean loss of {pos0['n_docs']} documents in bins of {pos0['curve'][0]['hi']} positions"
             + (f", minus {reference}'s at the same positions of the same documents" if reference else "")
             + (f"; bands ± std across {n_seeds} seeds" if n_seeds > 1 else "; one seed")
             + f". Dashed: L = {L}" + (f"; dotted: the fine-tuned length {_multiple(tuned, L)}" if tuned else ""),
             ha="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_headline(results, path, wall, rescue, training_free=(), reference=None):
    """Two panels of loss by position on a linear axis. "The wall": the `wall` models (the schemes) with L
    marked, and a model that cannot run past its table ended by a wall. "The rescue": the `rescue` models
    (the extended scheme and its fine-tunes, solid) and `training_free` ones (dashed), with L and the
    fine-tuned length marked. Each point is the mean over the documents in bins of positions (the curve of
    tasks.loss_by_position), minus the `reference` model's at the same positions of the same documents when
    given: what the documents make easy or hard at a position cancels, and what is left is the model's. A
    band is ± std across seeds when several were merged. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models, L, tuned = results["models"], results["base_len"], fine_tuned_length(results)
    n_seeds = seeds(results)
    ref = [c["mean"] for c in models[reference]["position"]["curve"]] if reference else None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    every = list(dict.fromkeys((*wall, *rescue, *training_free)))
    color = {k: plt.get_cmap("tab10").colors[i % 10] for i, k in enumerate(every)}  # one color per model, both panels
    shown = []
    for ax, labels, dashed in ((a1, wall, ()), (a2, (*rescue, *training_free), training_free)):
        for k in labels:
            pos = models[k]["position"]
            xs, ys, curve = _relative_curve(models, k, ref)
            shown += ys
            line, = ax.plot(xs, ys, linestyle="--" if k in dashed else "-", linewidth=1.2 if k in dashed else 2.2,
                            color=color[k], label=k + (" (the reference)" if k == reference else ""))
            if n_seeds > 1:
                _band(ax, xs, ys, [c.get("mean_sd") or 0.0 for c in curve], line.get_color())
            if pos.get("cannot_run"):  # the table ends: draw the wall where the line stops
                end = pos["evaluated_len"]
                ax.axvline(end, color=line.get_color(), linewidth=5, alpha=0.5)
                ax.annotate(f"{k}: cannot run past {end}", (end, 0.93), xycoords=("data", "axes fraction"),
                            xytext=(8, 0), textcoords="offset points", color=line.get_color(), fontsize=9,
                            fontweight="bold")
        ax.axvline(L, color="gray", linestyle="--", linewidth=1)
        ax.annotate(f"L = {L}", (L, 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", color="gray", fontsize=9)
        ax.set(xlim=(0, results["max_len"]), xlabel="token position")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)  # below
    if tuned:
        a2.axvline(tuned, color="gray", linestyle=":", linewidth=1.5)
        a2.annotate(f"fine-tuned length {_multiple(tuned, L)}", (tuned, 0), xycoords=("data", "axes fraction"),
                    xytext=(3, 4), textcoords="offset points", color="gray", fontsize=9)
    lo, hi = min(shown), max(shown)
    a1.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
    pos0 = models[wall[0]]["position"]
    a1.set(ylabel=f"loss − {reference}'s loss (nats)" if reference else "loss (nats)",
           title="The wall: every scheme trained at L, evaluated to " + _multiple(results["max_len"], L))
    a2.set(title="The rescue: RoPE, fine-tuned (solid), training-free (dashed)")
    fig.text(0.5, -0.22, f"Mean loss of {pos0['n_docs']} documents in bins of {pos0['curve'][0]['hi']} positions"
             + (f", minus {reference}'s at the same positions of the same documents" if reference else "")
             + (f"; bands ± std across {n_seeds} seeds" if n_seeds > 1 else "; one seed"), ha="center", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
