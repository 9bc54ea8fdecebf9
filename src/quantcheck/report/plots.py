"""The report's figures: matplotlib (Agg), saved as PNG files in ``<run_dir>/figures/``.

Every ``plot_*`` function returns the path of the PNG it wrote, or ``None`` when the run folder
does not hold the data it needs (the report then says what is missing, see :data:`FIGURES`).
Figures are built with :class:`matplotlib.figure.Figure` directly, never through pyplot, so they
leave no global state behind and are safe to draw from any thread. Each model keeps one color in
every figure (:func:`model_colors`); the reference is always dark gray.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display is ever needed; harmless if already set

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from quantcheck.analysis import format as fmt  # noqa: E402
from quantcheck.report.data import RunData, reference_model  # noqa: E402
from quantcheck.report.table import corpus_wording, recommendation  # noqa: E402
from quantcheck.schema.results import ItemRecord, ModelResult, Results, WindowRecord  # noqa: E402
from quantcheck.schema.sensitivity import SensitivityTable  # noqa: E402
from quantcheck.storage.store import write_bytes_atomic  # noqa: E402

DPI = 110
FIGURES_DIR = "figures"
REFERENCE_COLOR = "#3a3a3a"
# Okabe-Ito (color-blind safe) without yellow and black, then tab10 for long lists.
_PALETTE = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
    "#1f77b4", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
]  # fmt: skip
_STYLE = {
    "font.size": 10.5,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10.5,
    "legend.fontsize": 9.5,
    "xtick.labelsize": 9.5,
    "ytick.labelsize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "figure.titlesize": 13,
    "figure.titleweight": "bold",
}
_GIB = 1024**3
_MIB = 1024**2
# `vert` is deprecated since matplotlib 3.10 in favour of `orientation`
_MPL_VERSION = tuple(int(p) for p in matplotlib.__version__.split(".")[:2] if p.isdigit())
_HORIZONTAL = {"orientation": "horizontal"} if _MPL_VERSION >= (3, 10) else {"vert": False}
KL_FLOOR = 1e-7  # KL values below this are drawn at this value on the log axis
ROLLING_TOKENS = 32  # the corpus KL line is the mean over this many consecutive scored tokens


def model_colors(results: Results, items: list[ItemRecord] | None = None) -> dict[str, str]:
    """One color per model name, stable across all figures and the HTML."""
    ref = reference_model(results)
    names: list[str] = [m.name for m in results.models]
    for rec in items or []:
        if rec.model not in names:
            names.append(rec.model)
    colors: dict[str, str] = {}
    i = 0
    for name in names:
        if (ref is not None and name == ref.name) or name == "reference":
            colors[name] = REFERENCE_COLOR
        else:
            colors[name] = _PALETTE[i % len(_PALETTE)]
            i += 1
    return colors


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, out_dir: Path, filename: str) -> Path:
    buf = io.BytesIO()
    # metadata without the software/version stamp keeps re-renders byte-identical
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return write_bytes_atomic(out_dir / filename, buf.getvalue())


def _styled(fn: Callable[..., Path | None]) -> Callable[..., Path | None]:
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_STYLE):
            return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# ------------------------------------------------------------------------- (1) memory & latency


@_styled
def plot_cost(results: Results, out_dir: Path, colors: dict[str, str]) -> Path | None:
    """Peak memory and median forward latency vs batch size, one line per model, OOM marked X."""
    series = [(m, m.cost.latency) for m in results.models if m.cost is not None and m.cost.latency]
    if not any(p.status in ("ok", "oom", "failed") for _, pts in series for p in pts):
        return None

    fig, (ax_mem, ax_lat) = _new_figure(11.0, 4.4, ncols=2)
    batch_sizes: set[int] = set()
    failures: list[tuple[str, int, str]] = []  # (model, batch, "OOM"/"failed")
    seq_lens: set[int] = set()
    for m, pts in series:
        color = colors.get(m.name, REFERENCE_COLOR)
        ok = sorted((p for p in pts if p.status == "ok"), key=lambda p: p.batch_size)
        for p in pts:
            batch_sizes.add(p.batch_size)
            seq_lens.add(p.seq_len)
            if p.status in ("oom", "failed"):
                failures.append((m.name, p.batch_size, "OOM" if p.status == "oom" else "failed"))
        mem = [(p.batch_size, p.peak_memory_bytes / _GIB) for p in ok if p.peak_memory_bytes is not None]
        if mem:
            ax_mem.plot(*zip(*mem), marker="o", color=color, label=m.name, lw=2)
        lat = [p for p in ok if p.median_s is not None]
        if lat:
            x = [p.batch_size for p in lat]
            y = np.array([p.median_s * 1000 for p in lat])
            lo = np.array([(p.p10_s if p.p10_s is not None else p.median_s) * 1000 for p in lat])
            hi = np.array([(p.p90_s if p.p90_s is not None else p.median_s) * 1000 for p in lat])
            ax_lat.errorbar(
                x,
                y,
                yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)],
                marker="o",
                color=color,
                label=m.name,
                lw=2,
                capsize=3,
            )
            noisy = [(p.batch_size, p.median_s * 1000) for p in lat if p.noisy]
            if noisy:
                ax_lat.scatter(*zip(*noisy), s=140, facecolors="none", edgecolors=color, lw=1.2, zorder=4)

    for ax in (ax_mem, ax_lat):
        ax.set_xscale("log", base=2)
        ticks = sorted(batch_sizes)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(b) for b in ticks])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylim(bottom=0)
        if ticks:
            ax.set_xlim(ticks[0] / 1.4, ticks[-1] * 1.4)
        # headroom for the OOM markers
        top = ax.get_ylim()[1] if ax.has_data() else 1.0
        ax.set_ylim(0, top * 1.3)
        # OOM / failure markers: an X at the top of each panel, one row per failing model
        rows: dict[str, int] = {}
        for name, batch, kind in failures:
            row = rows.setdefault(name, len(rows))
            y = 0.95 - 0.085 * row
            color = colors.get(name, REFERENCE_COLOR)
            ax.scatter(
                [batch],
                [y],
                marker="X" if kind == "OOM" else "x",
                s=110,
                color=color,
                transform=ax.get_xaxis_transform(),
                zorder=5,
                clip_on=False,
                linewidths=1.5,
            )
            ax.annotate(
                f"{kind}: {name}",
                (batch, y),
                xycoords=ax.get_xaxis_transform(),
                xytext=(-8, 0),
                textcoords="offset points",
                ha="right",
                va="center",
                fontsize=8.5,
                color=color,
            )
    ax_mem.set_ylabel("peak memory (GiB)")
    ax_mem.set_title("Peak memory vs batch size")
    ax_lat.set_ylabel("median forward latency (ms), p10\u2013p90 bars")
    ax_lat.set_title("Forward latency vs batch size")
    handles, labels = [], []
    for ax in (ax_mem, ax_lat):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if failures:
        handles.append(Line2D([], [], marker="X", color="gray", ls="none", markersize=9))
        labels.append("out of memory (OOM)")
    if handles:
        ax_mem.legend(handles, labels, loc="upper left", frameon=False)
    seq = f", sequence length {sorted(seq_lens)[0]}" if len(seq_lens) == 1 else ""
    fig.suptitle(f"Cost: reference vs quantized variants{seq}")
    return _save(fig, out_dir, "cost.png")


# ------------------------------------------------------------------------------- (2) Jaccard@k


@_styled
def plot_jaccard(results: Results, out_dir: Path, colors: dict[str, str]) -> Path | None:
    """Top-k Jaccard index vs k per variant, with bootstrap confidence bands."""
    ref = reference_model(results)
    variants = [m for m in results.models if m is not ref and m.agreement is not None and m.agreement.jaccard]
    if not variants:
        return None
    fig, (ax,) = _new_figure(8.0, 4.4)
    ks_seen: set[int] = set()
    lows = [1.0]
    for m in variants:
        pts = sorted(m.agreement.jaccard.items())
        ks = [k for k, _ in pts]
        ks_seen.update(ks)
        vals = [e.value for _, e in pts]
        color = colors.get(m.name, "C0")
        ax.plot(ks, vals, marker="o", color=color, lw=2, label=m.name)
        if all(e.ci is not None for _, e in pts):
            lo = [e.ci.low for _, e in pts]
            hi = [e.ci.high for _, e in pts]
            ax.fill_between(ks, lo, hi, color=color, alpha=0.18, lw=0)
            lows.extend(lo)
        lows.extend(vals)
    ax.axhline(1.0, color=REFERENCE_COLOR, ls="--", lw=1, label="identical to reference")
    ax.set_xscale("log")
    ticks = sorted(ks_seen)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(k) for k in ticks])
    ax.minorticks_off()
    bottom = max(0.0, min(lows) - 0.05)
    ax.set_ylim(bottom, 1.02)
    ax.set_xlabel("k (top-k next tokens compared)")
    ax.set_ylabel("Jaccard index of top-k sets (95% CI band)")
    ax.set_title("Next-token agreement with the reference: Jaccard@k")
    ax.legend(loc="lower left", frameon=False)
    return _save(fig, out_dir, "jaccard.png")


# ------------------------------------------------------------------------------------ (3) KL


@_styled
def plot_kl(results: Results, items: list[ItemRecord], out_dir: Path, colors: dict[str, str]) -> Path | None:
    """Distribution of per-item KL(reference || variant) per variant, log scale."""
    ref = reference_model(results)
    ref_name = ref.name if ref is not None else "reference"
    per_model: dict[str, list[float]] = {}
    floored = False
    for rec in items:
        if rec.model == ref_name or rec.model == "reference" or rec.kl is None:
            continue
        if math.isnan(rec.kl):
            continue
        floored = floored or rec.kl < KL_FLOOR
        per_model.setdefault(rec.model, []).append(max(rec.kl, KL_FLOOR))
    if not per_model:
        return None
    order = [m.name for m in results.models if m.name in per_model] + sorted(
        n for n in per_model if n not in {m.name for m in results.models}
    )
    data = [np.array(per_model[n]) for n in order]
    height = 1.9 + 0.8 * len(order)
    fig, (ax,) = _new_figure(9.0, height)
    positions = np.arange(1, len(order) + 1)
    bp = ax.boxplot(
        data,
        positions=positions,
        widths=0.55,
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "black", "lw": 1.5},
        **_HORIZONTAL,
    )
    rng = np.random.default_rng(0)
    for i, (name, values) in enumerate(zip(order, data)):
        color = colors.get(name, "C0")
        bp["boxes"][i].set_facecolor(color)
        bp["boxes"][i].set_alpha(0.35)
        shown = values if len(values) <= 2000 else rng.choice(values, 2000, replace=False)
        jitter = rng.uniform(-0.18, 0.18, size=len(shown))
        ax.scatter(
            shown,
            positions[i] + jitter,
            s=20,
            color=color,
            alpha=0.7 if len(shown) < 200 else 0.25,
            lw=0,
            zorder=3,
            rasterized=len(shown) > 500,
        )
        ax.scatter(
            [values.mean()],
            [positions[i]],
            marker="D",
            s=55,
            color="white",
            edgecolors="black",
            zorder=4,
            label="mean" if i == 0 else None,
        )
    ax.set_yticks(positions)
    ax.set_yticklabels([f"{n}\n(n={len(v)})" for n, v in zip(order, data)])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(
        results.thresholds.max_mean_kl,
        color="#b22222",
        ls="--",
        lw=1.2,
        label=f"max mean KL threshold ({fmt.nats(results.thresholds.max_mean_kl)})",
    )
    floor_note = f"; values < {KL_FLOOR:g} drawn at {KL_FLOOR:g}" if floored else ""
    ax.set_xlabel(f"KL(reference \u2016 variant) per item, nats (log scale{floor_note})")
    ax.set_title("Per-item KL divergence from the reference at the answer position")
    ax.grid(axis="y", visible=False)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return _save(fig, out_dir, "kl.png")


# ----------------------------------------------------------------------------- (3b) corpus KL


@_styled
def plot_corpus_kl(
    results: Results, windows: dict[str, list[WindowRecord]], out_dir: Path, colors: dict[str, str]
) -> Path | None:
    """Per-token KL(reference || variant) along the text or the answers, sequence after sequence: where a variant
    departs from the reference, which the table's percentiles cannot say. Sequences lie end to end (answers differ
    in length); the legend's mean is the sequences' mean, as the table's Mean KLD (each prompt counts once)."""
    ref = reference_model(results)
    names = [m.name for m in results.models if m is not ref and any(r.kl is not None for r in windows.get(m.name, []))]
    if not names:
        return None
    lengths: dict[int, int] = {}
    for name in names:
        for r in windows[name]:
            if r.kl is not None:
                lengths[r.window] = max(lengths.get(r.window, 0), len(r.kl))
    order = sorted(lengths)
    starts = dict(zip(order, np.cumsum([0, *[lengths[w] for w in order]]).tolist()))
    total = sum(lengths.values())
    wording = corpus_wording(results)
    fig, (ax,) = _new_figure(11.0, 4.6)
    for w in order[1:]:
        ax.axvline(starts[w], color="gray", lw=0.8, alpha=0.35, zorder=0)
    floored = False
    for name in names:
        records = [r for r in windows[name] if r.kl is not None]
        x = np.concatenate([starts[r.window] + np.arange(len(r.kl)) for r in records])
        kl = np.concatenate([np.asarray(r.kl, dtype=float) for r in records])
        floored = floored or bool((kl < KL_FLOOR).any())
        color = colors.get(name, "C0")
        ax.plot(
            x,
            np.maximum(kl, KL_FLOOR),
            ls="none",
            marker=".",
            ms=2.5,
            color=color,
            alpha=0.25,
            rasterized=len(kl) > 2000,
        )
        span = min(ROLLING_TOKENS, len(kl))
        rolling = np.convolve(kl, np.ones(span) / span, mode="valid")
        ax.plot(
            x[span - 1 :] - (span - 1) / 2,
            np.maximum(rolling, KL_FLOOR),
            color=color,
            lw=1.8,
            label=f"{name} (mean {fmt.nats(float(np.mean([np.mean(r.kl) for r in records])))})",
        )
    ax.axhline(
        results.thresholds.max_mean_kl,
        color="#b22222",
        ls="--",
        lw=1.2,
        label=f"max mean KL threshold ({fmt.nats(results.thresholds.max_mean_kl)})",
    )
    ax.set_yscale("log")
    ax.set_xlim(0, total)
    unit = wording.unit
    per = f"{lengths[order[0]]} per {unit}; " if len(set(lengths.values())) == 1 else ""
    ax.set_xlabel(f"scored token {wording.along}, {unit} by {unit} ({per}faint lines: {unit} boundaries)")
    floor_note = f"; values < {KL_FLOOR:g} drawn at {KL_FLOOR:g}" if floored else ""
    ax.set_ylabel(f"KL(reference \u2016 variant), nats\n(log scale{floor_note})")
    ax.set_title(f"KL divergence per token {wording.along} (line: mean over {ROLLING_TOKENS} tokens)")
    ax.grid(axis="x", visible=False)
    fig.legend(loc="outside lower center", ncols=min(4, len(names) + 1), frameon=False)
    return _save(fig, out_dir, "corpus_kl.png")


@_styled
def plot_position(results: Results, out_dir: Path, colors: dict[str, str]) -> Path | None:
    """Mean KL in equal shares of each sequence's scored tokens, in order: damage that grows with the context."""
    variants = [m for m in results.models[1:] if m.corpus is not None and m.corpus.by_position]
    if not variants:
        return None
    fig, (ax,) = _new_figure(8.0, 4.4)
    for m in variants:
        buckets = m.corpus.by_position
        x = [(b.start + b.end) / 2 for b in buckets]
        y = [max(b.kl.value, KL_FLOOR) for b in buckets]
        low = [max(b.kl.ci.low, KL_FLOOR) if b.kl.ci else v for b, v in zip(buckets, y)]
        high = [b.kl.ci.high if b.kl.ci else v for b, v in zip(buckets, y)]
        color = colors.get(m.name, "C0")
        growth = m.corpus.kl_growth
        grows = growth is not None and growth.ci is not None and growth.ci.low > 0
        ax.plot(x, y, marker="o", color=color, lw=2, label=m.name + (" (grows)" if grows else ""))
        ax.fill_between(x, low, high, color=color, alpha=0.15, lw=0)
    ax.axhline(results.thresholds.max_mean_kl, color="#2e7d32", ls="--", lw=1.1)
    ax.set_yscale("log")
    equal = all(b.end - b.start > 1 for b in variants[0].corpus.by_position)
    ax.set_xlabel("scored token of the sequence (0 = its first scored token)" if equal else "share of the answer")
    ax.set_ylabel("mean KL (nats, 95% CI over sequences)")
    ax.set_title("KL along the context")
    ax.legend(frameon=False)
    return _save(fig, out_dir, "position.png")


def corpus_kl_caption(results: Results) -> str:
    """The caption names the run's own sequences: a text's windows or the answers to users' prompts."""
    wording = corpus_wording(results)
    return (
        f"KL(reference \u2016 variant) at every scored token {wording.along}, {wording.unit} by {wording.unit} "
        f"(light points), with its mean over {ROLLING_TOKENS} consecutive tokens (line); faint vertical lines separate "
        f"the {wording.units}. Log scale: a KL below {KL_FLOOR:g} (an identical prediction) is drawn at {KL_FLOOR:g}."
    )


# ------------------------------------------------------------------------ (4) accuracy & speed


@_styled
def plot_accuracy(results: Results, out_dir: Path, colors: dict[str, str], n_choices: int | None = None) -> Path | None:
    """Accuracy with 95% intervals per model (loglik and generative), plus words per minute."""
    models = [m for m in results.models if m.loglik is not None or m.generative is not None]
    if not models:
        return None
    fig, (ax, ax_wpm) = _new_figure(11.0, 4.6, ncols=2)
    fig.get_layout_engine().set(wspace=0.08)
    xs = np.arange(len(models))
    method_style = {"log-likelihood": ("o", -0.15), "generative": ("s", 0.15)}
    all_vals: list[float] = []
    for x, m in zip(xs, models):
        color = colors.get(m.name, "C0")
        for method, acc in (
            ("log-likelihood", m.loglik),
            ("generative", m.generative.accuracy if m.generative else None),
        ):
            if acc is None:
                continue
            marker, dx = method_style[method]
            y = acc.accuracy * 100
            lo, hi = acc.ci.low * 100, acc.ci.high * 100
            ax.errorbar(
                [x + dx],
                [y],
                yerr=[[max(y - lo, 0)], [max(hi - y, 0)]],
                marker=marker,
                ms=8,
                color=color,
                capsize=4,
                lw=2,
                mfc=color if method == "log-likelihood" else "white",
                mew=2,
            )
            all_vals.extend([lo, hi])
    if n_choices and n_choices > 1:
        chance = 100 / n_choices
        ax.axhline(chance, color="gray", ls=":", lw=1.2)
        ax.annotate(
            f"chance ({chance:.0f}%)",
            (1.0, chance),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 3),
            textcoords="offset points",
            ha="right",
            fontsize=8.5,
            color="gray",
        )
        all_vals.append(chance)
    lo_lim = max(0.0, min(all_vals) - 8)
    hi_lim = min(100.0, max(all_vals) + 8)
    ax.set_ylim(lo_lim, hi_lim)
    ax.set_xticks(xs)
    ax.set_xticklabels(
        [m.name for m in models], rotation=20 if len(models) > 4 else 0, ha="right" if len(models) > 4 else "center"
    )
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_title("Multiple-choice accuracy per model")
    ax.grid(axis="x", visible=False)
    ax.legend(
        [
            Line2D([], [], marker="o", color="gray", ls="none", ms=8),
            Line2D([], [], marker="s", color="gray", mfc="white", mew=2, ls="none", ms=8),
        ],
        ["log-likelihood scoring", "generative (parsed answer)"],
        loc="lower left",
        frameon=True,
        framealpha=0.9,
    )

    gen_models = [m for m in models if m.generative is not None]
    if gen_models:
        gx = np.arange(len(gen_models))
        wpm = [m.generative.words_per_minute for m in gen_models]
        bars = ax_wpm.bar(gx, wpm, color=[colors.get(m.name, "C0") for m in gen_models], width=0.6, alpha=0.85)
        for bar, m in zip(bars, gen_models):
            ax_wpm.annotate(
                f"{m.generative.words_per_minute:.0f} wpm\n{m.generative.mean_output_words:.1f} words avg",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8.5,
            )
        ax_wpm.set_ylim(0, max(wpm) * 1.3 if max(wpm) > 0 else 1)
        ax_wpm.set_xticks(gx)
        ax_wpm.set_xticklabels(
            [m.name for m in gen_models],
            rotation=20 if len(gen_models) > 4 else 0,
            ha="right" if len(gen_models) > 4 else "center",
        )
        ax_wpm.grid(axis="x", visible=False)
    else:
        ax_wpm.text(
            0.5,
            0.5,
            "generative scoring not measured",
            ha="center",
            va="center",
            transform=ax_wpm.transAxes,
            color="gray",
        )
        ax_wpm.set_xticks([])
    ax_wpm.set_ylabel("words per minute (generation)")
    ax_wpm.set_title("Generation speed (confounded by answer length)")
    fig.suptitle("Task accuracy and generation speed: reference vs variants")
    return _save(fig, out_dir, "accuracy.png")


# ------------------------------------------------------------------------------- (5) trade-off

DECISION_MARKERS = {
    "QUANTIZE": {"marker": "o"},
    "DON'T QUANTIZE": {"marker": "X", "ms": 13},
    "INCONCLUSIVE": {"marker": "o", "mfc": "white", "mew": 2},
}
"""How each verdict is drawn in the trade-off chart; a variant without a verdict gets a gray dot."""
DECIDING_OUTCOME = {"DON'T QUANTIZE": "fail", "INCONCLUSIVE": "unclear"}


def verdict_label(model: ModelResult) -> str:
    """The variant's name and verdict, then the checks that decided it: "nf4: DON'T QUANTIZE\nfail: mean KL"."""
    if model.verdict is None:
        return f"{model.name}: no verdict"
    verdict = model.verdict
    outcome = DECIDING_OUTCOME.get(verdict.decision)
    deciding = [name for name, result in verdict.checks.items() if result == outcome]
    return f"{model.name}: {verdict.decision}" + (f"\n{outcome}: {', '.join(deciding)}" if deciding else "")


def tradeoff_figure(results: Results, colors: dict[str, str]) -> Figure | None:
    """Memory saved (x) vs quality lost (y): accuracy drop with CI, or mean KL when no accuracy.

    The chart shows two of the verdict's checks, the verdict weighs them all: so each point is
    drawn by its verdict (marker) and labelled with the checks that decided it, and the shaded
    corner says it holds only the two limits drawn, never that a variant meets every threshold.
    """
    ref = reference_model(results)
    variants = [m for m in results.models if m is not ref and m.cost_vs_reference is not None]
    use_accuracy = any(m.paired_loglik is not None for m in variants)
    if use_accuracy:
        pts = [m for m in variants if m.paired_loglik is not None]
    else:
        pts = [m for m in variants if m.agreement is not None]
    if not pts:
        return None
    t = results.thresholds
    fig, (ax,) = _new_figure(8.0, 5.0)
    xs, ys = [0.0], [0.0]
    labels: list[tuple[str, float, float, str]] = []
    for m in pts:
        color = colors.get(m.name, "C0")
        style = {
            "ms": 10,
            **DECISION_MARKERS.get(m.verdict.decision if m.verdict else "", {"marker": "o", "mfc": "gray"}),
        }
        x = m.cost_vs_reference.memory_saving * 100
        if use_accuracy:
            pl = m.paired_loglik
            y = -pl.difference * 100
            lo, hi = -pl.difference_ci.high * 100, -pl.difference_ci.low * 100
            yerr = [[max(y - lo, 0)], [max(hi - y, 0)]]
            ys.extend([lo, hi])
        else:
            y = m.agreement.kl.mean.value
            ci = m.agreement.kl.mean.ci
            yerr = [[max(y - ci.low, 0)], [max(ci.high - y, 0)]] if ci else None
            if ci:
                ys.extend([ci.low, ci.high])
        ax.errorbar([x], [y], yerr=yerr, color=color, capsize=5, lw=2, zorder=4, gid=m.name, **style)
        xs.append(x)
        ys.append(y)
        labels.append((verdict_label(m), x, y, color))
    ax.scatter([0], [0], marker="*", s=180, color=REFERENCE_COLOR, zorder=4)
    ax.annotate("reference", (0, 0), xytext=(9, -12), textcoords="offset points", fontsize=9.5, color=REFERENCE_COLOR)

    x_thr = t.min_memory_saving * 100
    y_thr = t.max_accuracy_drop * 100 if use_accuracy else t.max_mean_kl
    xs.append(x_thr)
    ys.append(y_thr)
    x_lo, x_hi = min(min(xs) - 5, -5), max(max(xs) + 10, 100 if max(xs) > 60 else max(xs) + 10)
    y_span = max(ys) - min(ys) or 1.0
    y_lo, y_hi = min(ys) - 0.15 * y_span, max(ys) + 0.2 * y_span
    if not use_accuracy:
        y_lo = min(y_lo, 0)
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    for text, x, y, color in labels:  # labels grow towards the middle, so they stay inside the axes
        right = x > (x_lo + x_hi) / 2
        ax.annotate(
            text,
            (x, y),
            xytext=(-9 if right else 9, 7),
            textcoords="offset points",
            fontsize=9.5,
            color=color,
            fontweight="bold",
            ha="right" if right else "left",
        )
    ax.axvline(x_thr, color="#2e7d32", ls="--", lw=1.1)
    ax.axhline(y_thr, color="#2e7d32", ls="--", lw=1.1)
    ax.fill_between([x_thr, x_hi], [y_lo, y_lo], [y_thr, y_thr], color="#2e7d32", alpha=0.08, lw=0)
    drawn = "accuracy" if use_accuracy else "mean-KL"
    ax.annotate(
        f"memory and {drawn} limits only; the marker shows the verdict",
        (x_hi, y_lo),
        xytext=(-6, 6),
        textcoords="offset points",
        ha="right",
        va="bottom",
        fontsize=8.5,
        color="#2e7d32",
    )
    if use_accuracy:
        ax.axhline(0, color="gray", lw=0.8)
    decisions = list(dict.fromkeys(m.verdict.decision for m in pts if m.verdict))
    if decisions:
        handles = [Line2D([], [], color="gray", ls="none", **{"ms": 9, **DECISION_MARKERS[d]}) for d in decisions]
        ax.legend(handles, decisions, loc="upper left", frameon=False, title="verdict")
    ax.set_xlabel("weight memory saved vs reference (%)  \u2192 cheaper")
    if use_accuracy:
        ax.set_ylabel("accuracy drop vs reference (pts, loglik, 95% CI)  \u2191 worse")
        ax.set_title("Trade-off: memory saved vs accuracy lost")
    else:
        ax.set_ylabel("mean KL from reference (nats)  \u2191 worse")
        ax.set_title("Trade-off: memory saved vs mean KL")
    return fig


@_styled
def plot_tradeoff(results: Results, out_dir: Path, colors: dict[str, str]) -> Path | None:
    """The trade-off chart (`tradeoff_figure`) as tradeoff.png."""
    fig = tradeoff_figure(results, colors)
    return None if fig is None else _save(fig, out_dir, "tradeoff.png")


# ------------------------------------------------------------------------------- (6) which to serve

SERVE_FIGURE = "serve"
"""The figure the report draws beside the recommendation, at the top, instead of among the others."""
VERDICT_COLORS = {"QUANTIZE": "#2e7d32", "DON'T QUANTIZE": "#c62828", "INCONCLUSIVE": "#e0a100"}
"""The serve chart colours each variant by its verdict (no verdict: gray)."""


def serve_figure(results: Results) -> Figure | None:
    """Mean KL (y, log, 95% interval) against weight memory (x) for every variant with both, coloured by verdict; the
    recommendation's front dotted, the recommended variant ringed, the reference's memory a vertical line."""
    rec = recommendation(results)
    points = [s for s in rec.standings if s.mean_kl is not None and s.weight_bytes is not None]
    if not points:
        return None
    fig, (ax,) = _new_figure(8.0, 4.8)
    for i, s in enumerate(points):
        x, y, ci = s.weight_bytes / _MIB, max(s.mean_kl.value, KL_FLOOR), s.mean_kl.ci
        color = VERDICT_COLORS.get(s.decision or "", "gray")
        yerr = [[max(y - max(ci.low, KL_FLOOR), 0)], [max(ci.high - y, 0)]] if ci else None
        marker = "^" if s.kl_is_lower_bound else "o"
        ax.errorbar([x], [y], yerr=yerr, color=color, marker=marker, ms=9, capsize=5, lw=2, zorder=4, gid=s.name)
        label = s.name + (" (≥)" if s.kl_is_lower_bound else "") + (" (stated)" if s.weight_stated else "")
        ax.annotate(label, (x, y), xytext=(9, 6 if i % 2 == 0 else -14), textcoords="offset points", fontsize=9.5,
                    color=color, fontweight="bold")
    front = sorted((s.weight_bytes / _MIB, max(s.mean_kl.value, KL_FLOOR)) for s in points if s.on_front)
    if len(front) > 1:
        ax.plot(*zip(*front), color="#555555", ls=":", lw=1.3, zorder=2)
    chosen = next((s for s in points if rec.outcome == "variant" and s.name == rec.serve), None)
    if chosen is not None:
        ax.scatter([chosen.weight_bytes / _MIB], [max(chosen.mean_kl.value, KL_FLOOR)], s=480, facecolors="none",
                   edgecolors="#2e7d32", linewidths=2.2, zorder=5)
    reference = results.models[0]
    if reference.cost is not None and reference.cost.weight_bytes:
        ax.axvline(reference.cost.weight_bytes / _MIB, color=REFERENCE_COLOR, lw=1.1, ls="--")
        ax.annotate("reference", (reference.cost.weight_bytes / _MIB, 1), xycoords=("data", "axes fraction"),
                    xytext=(-4, -14), textcoords="offset points", ha="right", fontsize=9, color=REFERENCE_COLOR)
    ax.axhline(results.thresholds.max_mean_kl, color="#2e7d32", ls="--", lw=1.1)
    if rec.fit_gb is not None:
        ax.axvline(rec.fit_gb * _GIB / _MIB, color="#0b5cad", lw=1.1, ls="-.")
    ax.set_yscale("log")
    ax.set_xlim(left=0)
    decisions = [d for d in VERDICT_COLORS if any(s.decision == d for s in points)]
    handles = [Line2D([], [], color=VERDICT_COLORS[d], marker="o", ls="none", ms=8) for d in decisions]
    ax.legend(handles, decisions, loc="best", frameon=False, title="verdict")
    ax.set_xlabel("weight memory (MiB, measured)  ← cheaper")
    ax.set_ylabel("mean KL from reference (nats, 95% CI)  ↑ worse")
    ax.set_title("Which variant to serve: quality lost vs weight memory")
    return fig


@_styled
def plot_serve(results: Results, out_dir: Path, colors: dict[str, str]) -> Path | None:
    """The recommendation's chart (`serve_figure`) as serve.png."""
    fig = serve_figure(results)
    return None if fig is None else _save(fig, out_dir, "serve.png")


# ------------------------------------------------------------------------------- (7) per-layer sensitivity


@_styled
def plot_sensitivity(table: SensitivityTable | None, out_dir: Path) -> Path | None:
    """Mean KL with only each decoder layer quantized, in layer order; the layers the last measured proposal keeps at
    the reference's precision are hatched."""
    if table is None or not table.layers:
        return None
    layers = sorted(table.layers, key=lambda layer: layer.index)
    kept = set(table.proposals[-1].keep) if table.proposals else set()
    fig, (ax,) = _new_figure(9.0, 4.2)
    x = [layer.index for layer in layers]
    y = [max(layer.kl.value, KL_FLOOR) for layer in layers]
    low = [max(y_i - (layer.kl.ci.low if layer.kl.ci else y_i), 0) for layer, y_i in zip(layers, y)]
    high = [max((layer.kl.ci.high if layer.kl.ci else y_i) - y_i, 0) for layer, y_i in zip(layers, y)]
    colors = ["#9e9e9e" if layer.index in kept else "#c62828" for layer in layers]
    bars = ax.bar(x, y, color=colors, yerr=[low, high], capsize=2, error_kw={"lw": 0.8})
    for bar, layer in zip(bars, layers):
        if layer.index in kept:
            bar.set_hatch("//")
    ax.axhline(table.max_kl, color="#2e7d32", ls="--", lw=1.1)
    ax.set_xlabel("decoder layer (the only one quantized)")
    ax.set_ylabel("mean KL from reference (nats, 95% CI)")
    ax.set_title(f"Per-layer sensitivity: {table.method}, {table.items} questions")
    handles = [Line2D([], [], color="#c62828", lw=8), Line2D([], [], color="#9e9e9e", lw=8)]
    labels = ["quantized in the last proposal", "kept at the reference's precision"]
    ax.legend(handles, labels if kept else labels[:1], frameon=False)
    return _save(fig, out_dir, "sensitivity.png")


# ---------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class FigureSpec:
    key: str
    filename: str
    title: str
    caption: str | Callable[[Results], str]
    """Fixed, or written for the run where it names the run's own sequences."""
    needs: str
    kinds: tuple[str, ...] = ("questions", "text")
    """The runs (`RunData.kind`) the figure belongs to: in any other it is neither drawn nor missed."""

    def caption_for(self, results: Results) -> str:
        return self.caption(results) if callable(self.caption) else self.caption


FIGURES: list[FigureSpec] = [
    FigureSpec(
        "serve",
        "serve.png",
        "Which variant to serve: quality lost vs weight memory",
        "Each variant with both measured: its weight memory (x) against its mean KL from the reference (y, log scale, "
        "95% interval; a triangle is only a lower bound), coloured by its verdict. The dotted line joins the front "
        "(the variants no other beats beyond the measured noise), the ring marks the recommended variant, the dashed "
        "lines are the reference's memory and the mean-KL limit, a dash-dotted one the --fit-gb budget.",
        "needs a variant with mean KL and weight memory",
    ),
    FigureSpec(
        "tradeoff",
        "tradeoff.png",
        "Trade-off: memory saved vs quality lost",
        "Each point is a variant: weight memory saved (x) against accuracy lost on the log-likelihood task "
        "(y, percentage points with 95% interval; mean KL when accuracy was not measured). The marker shows the "
        "verdict (filled: quantize, cross: don't, hollow: inconclusive) and the label names the checks that "
        "decided it. The shaded corner is within the two limits drawn only; the verdict also weighs mean KL, "
        "top-1 agreement and generated-answer accuracy.",
        "needs cost_vs_reference and paired_loglik (or agreement) for at least one variant",
    ),
    FigureSpec(
        "corpus_kl",
        "corpus_kl.png",
        "KL divergence per scored token",
        corpus_kl_caption,
        "needs per-token kl values in models/<model>/corpus.jsonl for at least one variant",
        kinds=("text",),
    ),
    FigureSpec(
        "position",
        "position.png",
        "KL along the context",
        "Mean KL in eight equal shares of each sequence's scored tokens, in order (a text window's scored half, or a "
        "prompt's answer), with 95% intervals over sequences; the dashed line is the mean-KL limit. \"(grows)\" "
        "marks a variant whose last share is above its first beyond a paired interval over sequences: that informs "
        "and does not decide.",
        "needs a text or prompts run with per-token KL for at least one variant",
        kinds=("text",),
    ),
    FigureSpec(
        "cost",
        "cost.png",
        "Peak memory and forward latency vs batch size",
        "Peak memory and median forward latency (p10\u2013p90 bars; circled points are noisy) per batch size; "
        "an X marks a batch size that ran out of memory.",
        "needs cost.latency points for at least one model",
    ),
    FigureSpec(
        "accuracy",
        "accuracy.png",
        "Accuracy and generation speed",
        "Accuracy with 95% Wilson intervals for log-likelihood scoring (filled) and generative scoring (hollow). "
        "Words per minute depends on how long each model's answers are, so mean output words are shown with it.",
        "needs loglik or generative accuracy for at least one model",
        kinds=("questions",),
    ),
    FigureSpec(
        "jaccard",
        "jaccard.png",
        "Next-token agreement: Jaccard@k",
        "Overlap of the top-k next-token sets of each variant and the reference (1 = identical), "
        "with 95% bootstrap bands.",
        "needs agreement.jaccard for at least one variant",
    ),
    FigureSpec(
        "kl",
        "kl.png",
        "KL divergence per item",
        "Per-item KL(reference \u2016 variant) over the full vocabulary at the answer position; boxes show quartiles, "
        "diamonds the mean, the dashed line the mean-KL threshold.",
        "needs per-item kl values in items.jsonl",
        kinds=("questions",),
    ),
    FigureSpec(
        "sensitivity",
        "sensitivity.png",
        "Per-layer sensitivity",
        "Mean KL from the reference with only that decoder layer quantized (exact full rows, 95% interval), in layer "
        "order; hatched gray bars are the layers the last measured proposal keeps at the reference's precision, the "
        "dashed line is --max-kl. Per-layer KL need not add up: the proposals below are measured, not predicted.",
        "needs sensitivity.json (quantcheck sensitivity)",
        kinds=("sensitivity",),
    ),
]


def n_choices(data: RunData) -> int | None:
    ds = data.results.dataset
    if ds is not None and ds.answer_continuations:
        return len(ds.answer_continuations)
    lengths = {len(d.choices) for d in data.dataset.values() if d.choices}
    return lengths.pop() if len(lengths) == 1 else None


def draw(spec: FigureSpec, data: RunData, out_dir: Path, colors: dict[str, str]) -> Path | None:
    """Draw one registered figure."""
    r = data.results
    if spec.key == "cost":
        return plot_cost(r, out_dir, colors)
    if spec.key == "jaccard":
        return plot_jaccard(r, out_dir, colors)
    if spec.key == "kl":
        return plot_kl(r, data.items, out_dir, colors)
    if spec.key == "corpus_kl":
        return plot_corpus_kl(r, data.windows, out_dir, colors)
    if spec.key == "accuracy":
        return plot_accuracy(r, out_dir, colors, n_choices(data))
    if spec.key == "tradeoff":
        return plot_tradeoff(r, out_dir, colors)
    if spec.key == "position":
        return plot_position(r, out_dir, colors)
    if spec.key == "sensitivity":
        return plot_sensitivity(data.sensitivity, out_dir)
    if spec.key == "serve":
        return plot_serve(r, out_dir, colors)
    raise KeyError(spec.key)
