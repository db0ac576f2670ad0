"""The latent dashboards as a static site: an index and one page per latent, from dashboard.py's records.

Self-contained: inline CSS, the histogram as inline SVG, no fonts, images or scripts from anywhere. Every
piece of dataset or tokenizer text goes through `html.escape` (quotes too, so attribute values are safe), and
each page's Content-Security-Policy allows no script except the index's own search script (by its hash), so
even a mistake in escaping could not run a script from the data.
"""

import base64
import hashlib
import html
from collections.abc import Mapping
from typing import Any

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { padding: 2px 8px; text-align: left; border-bottom: 1px solid #eee; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.ctx { font-family: ui-monospace, monospace; white-space: pre; padding: 3px 0; }
.tok { border-radius: 2px; }
.tok.peak { outline: 2px solid #c0392b; }
.tok.none { color: #999; }
.muted { color: #777; } .where { white-space: nowrap; } h2 { margin-top: 1.5em; }
"""

SEARCH_SCRIPT = """
const box = document.getElementById("search");
const status = document.getElementById("status");
function filter() {
  const q = box.value.trim();
  let shown = 0;
  for (const row of document.querySelectorAll("tr[data-latent]")) {
    row.hidden = q !== "" && row.dataset.latent !== q;
    if (!row.hidden) shown += 1;
  }
  status.textContent = q === "" ? "" : (shown ? shown + " shown" : "no latent " + q + " here");
}
box.addEventListener("input", filter);
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _csp(script: str | None = None) -> str:
    digest = "'none'"
    if script is not None:
        digest = "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
    policy = f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src {digest}"
    return f'<meta http-equiv="Content-Security-Policy" content="{policy}">'


def _page(title: str, body: str, script: str | None = None) -> str:
    tail = f"<script>{script}</script>" if script is not None else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{_csp(script)}'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n{tail}</body></html>\n"
    )


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}g}"


def summary_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the index (and dashboard.json) says about one latent."""
    top = record["top_contexts"]
    return {
        "latent": record["latent"],
        "density": record["density"],
        "fired": record["fired"],
        "max_activation": record["max_activation"],
        "mean_activation": record["mean_activation"],
        "top_token": top[0]["tokens"][top[0]["peak"]] if top else None,
        "page": f"{record['hookpoint']}/{record['latent']}.html",
        "data": f"{record['hookpoint']}/{record['latent']}.json",
    }


def _visible(token: str) -> str:
    """A token's text with its line breaks and tabs made visible (the contexts are one line each)."""
    return token.replace("\n", "\u23ce").replace("\t", "\u21e5").replace("\r", "")


def context_html(context: Mapping[str, Any], scale: float | None) -> str:
    """One context on one line: each token's background as strong as its activation relative to `scale`
    (the latent's largest activation), the peak token outlined, a non-zero activation in its tooltip."""
    spans = []
    for i, (token, act) in enumerate(zip(context["tokens"], context["activations"], strict=True)):
        classes = ["tok"] + (["peak"] if i == context["peak"] else []) + (["none"] if act is None else [])
        alpha = 0.0 if act is None or not scale else max(0.0, min(1.0, act / scale))
        style = f' style="background:#ff8c00{round(alpha * 255):02x}"' if alpha > 0 else ""  # orange, alpha
        # A tooltip where there is something to say: most tokens of a window do not fire (0).
        tip = "excluded token (no activation)" if act is None else f"{act:.4g}" if act else None
        title = f' title="{_e(tip)}"' if tip else ""
        spans.append(f'<span class="{" ".join(classes)}"{style}{title}>{_e(_visible(token))}</span>')
    return "".join(spans)


def histogram_svg(hist: Mapping[str, Any], width: int = 480, height: int = 120) -> str:
    counts, bin_width = hist["counts"], hist["bin_width"]
    if not bin_width or not any(counts):
        return '<p class="muted">never fired on these tokens</p>'
    used = max(i for i, c in enumerate(counts) if c) + 1
    top = max(counts)
    bar = width / used
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - height * c / top:.1f}" width="{max(bar - 1, 1):.1f}" '
        f'height="{height * c / top:.1f}" fill="#e67e22">'
        f"<title>[{i * bin_width:.4g}, {(i + 1) * bin_width:.4g}): {c}</title></rect>"
        for i, c in enumerate(counts[:used])
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 16}" role="img" '
        f'aria-label="activation histogram">{bars}'
        f'<text x="0" y="{height + 13}" font-size="11">0</text>'
        f'<text x="{width}" y="{height + 13}" font-size="11" text-anchor="end">{used * bin_width:.4g}</text>'
        "</svg>"
    )


def latent_page(record: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """The page of one latent: statistics, histogram, logit lens, top contexts, quantile samples."""
    h, latent = record["hookpoint"], record["latent"]
    scale = record["max_activation"]
    parts = [
        f'<p><a href="../index.html">index</a> · <a href="{_e(latent)}.json">data (JSON)</a></p>',
        f"<h1>{_e(h)} · latent {_e(latent)}</h1>",
        f'<p id="stats">density {_fmt(record["density"])} ({record["fired"]} of {record["tokens"]} tokens) · '
        f"max activation {_fmt(scale)} · mean when firing {_fmt(record['mean_activation'])}</p>",
        "<h2>Activation histogram</h2>",
        histogram_svg(record["histogram"]),
        "<h2>Logit lens</h2>",
    ]
    lens = record["logit_lens"]
    if lens is None:
        parts.append(f'<p class="muted">{_e(record["logit_lens_note"])}</p>')
    else:
        rows = "".join(
            f'<tr><td class="ctx">{_e(_visible(up["token"]))}</td><td class="num">{up["logit"]:+.3f}</td>'
            f'<td class="ctx">{_e(_visible(down["token"]))}</td>'
            f'<td class="num">{down["logit"]:+.3f}</td></tr>'
            for up, down in zip(lens["promoted"], lens["suppressed"], strict=True)
        )
        parts.append(
            '<table id="logits"><tr><th>promoted</th><th>logit</th><th>suppressed</th><th>logit</th></tr>'
            f'{rows}</table><p class="muted">{_e(record["logit_lens_note"])}</p>'
        )
    parts.append("<h2>Top activations</h2>")
    if record["top_contexts"]:
        rows = "".join(
            f'<tr><td class="num">{c["activation"]:.4g}</td><td class="ctx">{context_html(c, scale)}</td>'
            f'<td class="muted where">seq {c["sequence"]}, pos {c["position"]}</td></tr>'
            for c in record["top_contexts"]
        )
        parts.append(f'<table id="top">{rows}</table>')
    else:
        parts.append('<p class="muted">never fired on these tokens</p>')
    if record["quantiles"]:
        parts.append(
            f'<h2>Quantile samples</h2><p class="muted">from {record["sample_size"]} random firing tokens</p>'
        )
        for q in record["quantiles"]:
            lo, hi = q["quantile"]
            rows = "".join(
                f'<tr><td class="num">{c["activation"]:.4g}</td>'
                f'<td class="ctx">{context_html(c, scale)}</td></tr>'
                for c in q["contexts"]
            )
            parts.append(
                f"<h3>quantile {lo:.0%}–{hi:.0%}: activations {q['range'][0]:.4g} – {q['range'][1]:.4g}</h3>"
                f'<table class="quantile">{rows}</table>'
            )
    parts.append(f'<p class="muted">{_e(_provenance(settings))}</p>')
    return _page(f"{h} latent {latent}", "\n".join(parts))


def _provenance(settings: Mapping[str, Any]) -> str:
    return (
        f"model {settings.get('model')}, SAEs {settings.get('sae_path')}, dataset {settings.get('dataset')} "
        f"(split {settings.get('split')}; held out: {settings.get('held_out')})"
    )


def index_page(summary: Mapping[str, list[Mapping[str, Any]]], settings: Mapping[str, Any]) -> str:
    """Every latent of every hookpoint, most frequent first, with a search box by latent id."""
    parts = [
        "<h1>Latent dashboards</h1>",
        f'<p class="muted">{_e(_provenance(settings))}; selection: {_e(settings.get("selection"))}</p>',
        '<p><label>latent id <input id="search" type="search" inputmode="numeric" autocomplete="off">'
        "</label> "
        '<span id="status" class="muted"></span></p>',
    ]
    for h, rows in summary.items():
        ordered = sorted(rows, key=lambda r: (-r["density"], r["latent"]))
        body = "".join(
            f'<tr data-latent="{_e(r["latent"])}">'
            f'<td class="num"><a href="{_e(r["page"])}">{_e(r["latent"])}</a></td>'
            f'<td class="num">{_fmt(r["density"])}</td><td class="num">{_fmt(r["max_activation"])}</td>'
            f'<td class="ctx">{_e(_visible(r["top_token"])) if r["top_token"] is not None else "—"}</td></tr>'
            for r in ordered
        )
        parts.append(
            f"<h2>{_e(h)}</h2><table><tr><th>latent</th><th>density</th><th>max act.</th>"
            f"<th>top token</th></tr>{body}</table>"
        )
    return _page("Latent dashboards", "\n".join(parts), SEARCH_SCRIPT)
