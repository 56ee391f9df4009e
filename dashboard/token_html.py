"""The token view: one completion's tokens as coloured spans, the colour one statistic, the hover every value.

HTML rather than a chart: text must wrap like text, and a span's `title` carries the exact values and the top-k
alternatives at forks. Streamlit's `st.html` sanitizes (DOMPurify) and keeps `class`, `style` and `title`.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

STATS = ("entropy", "renyi2", "group_js", "logprob")
# Warm for "uncertain" statistics; cool for logprob, where the surprising tokens are the very negative ones.
_RGB = {"entropy": (230, 85, 13), "renyi2": (217, 72, 1), "group_js": (117, 107, 177), "logprob": (49, 130, 189)}


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.6g}"


def _visible(text: str) -> str:
    # Whitespace-only tokens would be invisible (and unhoverable): show newlines and tabs as marks.
    return text.replace("\n", "↵\n").replace("\t", "⇥") if text.strip() else text.replace("\n", "↵\n") or "∅"


def _intensity(values: pd.Series, stat: str) -> pd.Series:
    v = values.astype(float)
    if stat == "logprob":  # 0 (certain) → no colour; the most negative of the completion → full colour
        lo = v.min()
        return (v / lo).clip(0, 1).fillna(0) if lo < 0 else v * 0
    hi = v.max()
    return (v / hi).clip(0, 1).fillna(0) if hi > 0 else v * 0


def _text(row) -> str:
    """The token's decoded text, or `#id` when the run's vocab has no entry for it."""
    return f"#{row.token_id}" if row.text is None or (isinstance(row.text, float) and math.isnan(row.text)) else row.text


def _title(row, stat: str) -> str:
    parts = [
        f"{_text(row)!r} · position {row.position}",
        " · ".join(f"{s} {_fmt(getattr(row, s))}" for s in STATS),
        f"gradient weight {_fmt(row.selected)}" + (" · fork" if row.is_fork else ""),
    ]
    alts, probs = getattr(row, "alt_texts", None), getattr(row, "alt_probs", None)
    # Non-fork rows carry a missing value here (NaN or NA after the left join), fork rows a list or an array.
    if isinstance(alts, list | tuple | np.ndarray) and isinstance(probs, list | tuple | np.ndarray) and len(alts):
        parts.append("alternatives (top-k):")
        for k, (t, p) in enumerate(zip(alts, probs, strict=False)):
            mark = "  ← sampled" if row.sampled_rank == k else ""
            parts.append(f"  {t!r} {float(p):.4f}{mark}")
    return "\n".join(parts)


def token_html(tokens: pd.DataFrame, stat: str) -> str:
    """`tokens`: completion_tokens rows (text, the STATS, selected, is_fork, optional alt_texts/alt_probs)."""
    if stat not in STATS:
        raise ValueError(f"stat {stat!r} is not one of {STATS}")
    r, g, b = _RGB[stat]
    alpha = _intensity(tokens[stat], stat)
    spans = []
    for row, a in zip(tokens.itertuples(index=False), alpha, strict=True):
        style = f"background: rgba({r},{g},{b},{0.08 + 0.8 * a:.3f});"
        classes = ["fw-token"]
        if row.selected is not None and not pd.isna(row.selected) and row.selected > 0:
            classes.append("fw-grad")
        if row.is_fork:
            classes.append("fw-fork")
        spans.append(
            f'<span class="{" ".join(classes)}" style="{style}" title="{html.escape(_title(row, stat))}">'
            f"{html.escape(_visible(_text(row)))}</span>"
        )
    return (
        "<style>"
        ".fw-tokens{font-family:ui-monospace,monospace;font-size:15px;line-height:2.1;white-space:pre-wrap;}"
        ".fw-token{padding:2px 1px;border-radius:3px;cursor:help;}"
        ".fw-grad{border-bottom:3px solid #2a9d8f;}"
        ".fw-fork{outline:1px dashed #444;}"
        "</style>"
        f'<div class="fw-tokens" data-stat="{stat}">{"".join(spans)}</div>'
    )


def legend_html(stat: str, tokens: pd.DataFrame) -> str:
    r, g, b = _RGB[stat]
    v = tokens[stat].astype(float)
    lo, hi = (v.min(), 0.0) if stat == "logprob" else (0.0, v.max())
    far = f"{lo:.3g} (full colour)" if stat == "logprob" else f"{hi:.3g} (full colour)"
    near = "0" if stat == "logprob" else f"{lo:.3g}"
    return (
        f'<div style="font-size:13px">colour = {html.escape(stat)}: '
        f'<span style="background:rgba({r},{g},{b},0.08);padding:1px 6px">{near}</span> → '
        f'<span style="background:rgba({r},{g},{b},0.88);padding:1px 6px;color:white">{far}</span>'
        ' · <span style="border-bottom:3px solid #2a9d8f">underlined</span> = received gradient'
        ' · <span style="outline:1px dashed #444">dashed box</span> = fork (hover: top-k alternatives)</div>'
    )
