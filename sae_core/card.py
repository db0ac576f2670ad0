"""The model card (README.md) published next to a run's SAEs.

A card is a pure function of what the run wrote (hookpoint cfg.json files, run.json, the evaluation report),
so publishing the same run twice renders the same bytes — which is what lets a re-publish be a no-op on the
Hub. Nothing here touches the network or the file system: `sae_core.hub` gathers the inputs and writes the
result.

Secrets never reach the card: configuration keys that name a credential (`hf_token`, `api_key`, ...) are
dropped, values that look like a Hugging Face token or equal a known secret are masked.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from .utils import natural_key

TAGS = ["sparse-autoencoder", "sae", "topk-sae", "interpretability", "sae_core"]

# Keys whose *name* says they hold a credential. "tokens", "max_tokens", "tokenizer" stay: they are
# counts/names.
_SECRET_KEY = re.compile(r"(^|_)(hf_?token|token|auth_token|access_token|api_key|apikey|secret|password)$")
# Values shaped like a Hugging Face access token, whatever key they sit under.
_HF_TOKEN_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}")
# What the Hub accepts as a repo id in `base_model` / `datasets`; a local path (the embedded GGUF folder) is
# not one.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

# Evaluation columns shown in the card, in order (report key, column title). The report keeps every metric.
EVAL_COLUMNS = [
    ("fvu", "FVU ↓"),
    ("l0", "L0"),
    ("dead_pct_eval", "dead % (eval)"),
    ("dead_pct_train", "dead % (train)"),
    ("ce_clean", "CE clean"),
    ("ce_sae", "CE spliced"),
    ("delta_ce", "ΔCE ↓"),
    ("loss_recovered_zero", "loss recovered vs zero ↑"),
    ("loss_recovered_mean", "loss recovered vs mean ↑"),
    ("kl", "KL ↓"),
]


def is_secret_key(key: str) -> bool:
    """True for configuration keys that name a credential (`hf_token`, `token`, `api_key`), not for
    `tokens`."""
    return bool(_SECRET_KEY.search(key.lower()))


def public_config(config: Mapping[str, Any], secrets: Sequence[str] = ()) -> dict[str, Any]:
    """Flatten a (nested) training config to dotted keys, without credentials.

    Drops keys named like a credential and masks any value that contains a known secret or looks like an HF
    token, so a token that slipped into an unexpected field still does not reach the card.
    """
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                if not is_secret_key(str(key)):
                    visit(f"{prefix}.{key}" if prefix else str(key), sub)
            return
        text = str(value)
        if _HF_TOKEN_VALUE.search(text) or any(s and s in text for s in secrets):
            value = "***"
        flat[prefix] = value

    visit("", config)
    return flat


def hub_id_or_none(name: Any) -> str | None:
    """`name` if it can be a Hub repo id (for `base_model`/`datasets` metadata), else None (e.g. a local
    path)."""
    if isinstance(name, str) and _HUB_ID.fullmatch(name) and ".." not in name:
        return name
    return None


def render_model_card(
    *,
    repo_id: str | None,
    hookpoints: Mapping[str, Mapping[str, Any]],
    run: Mapping[str, Any] | None = None,
    report: Mapping[str, Any] | None = None,
    report_md: str | None = None,
    plots: Sequence[str] = (),
    license: str = "mit",
    secrets: Sequence[str] = (),
    dashboard: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    sweep: Sequence[Mapping[str, str]] = (),
) -> str:
    """Render README.md for a set of SAEs.

    repo_id: the Hub repo (or local folder) the card lives in, used in the "load it" snippet.
    hookpoints: hookpoint name -> its cfg.json. run: run.json, if the run wrote one.
    report: eval report.json; report_md: report.md, used only when there is no report.json.
    plots: repo-relative paths of plot images (e.g. "eval/fvu.png"). secrets: strings that must never appear.
    dashboard: the summary rows of published latent dashboards (dashboard/dashboard.json), per hookpoint.
    sweep: when these SAEs are one variant of a one-pass sweep, every variant: {"variant", "location"}.
    """
    run = run or {}
    names = sorted(hookpoints, key=natural_key)
    model = run.get("model") or _first(hookpoints, "model")
    dataset = run.get("dataset") or ((report or {}).get("settings") or {}).get("dataset")

    front: dict[str, Any] = {"library_name": "sae_core", "license": license, "tags": list(TAGS)}
    if hub_id_or_none(model):
        front["base_model"] = model
    if hub_id_or_none(dataset):
        front["datasets"] = [dataset]
    parts = ["---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"]

    title_model = f" for {model}" if model else ""
    parts.append(f"# TopK sparse autoencoders{title_model}\n")
    parts.append(
        f"{len(names)} TopK sparse autoencoder{'s' if len(names) != 1 else ''} (SAEs, Gao et al. 2024) "
        "trained with `sae_core`, one per hookpoint. `layers.<i>` is the output of decoder block i "
        "(the residual stream after that block). The files follow EleutherAI's layout: "
        "`<hookpoint>/cfg.json` and `<hookpoint>/sae.safetensors`.\n"
    )
    parts.append(_summary_table(names, hookpoints, run, model, dataset))
    parts.append(_load_snippet(repo_id, names))
    parts.append(_saes_table(names, hookpoints))
    if report or report_md:
        parts.append(_evaluation(report, report_md, plots, names))
    elif plots:
        parts.append("## Plots\n\n" + "".join(f"![{_stem(p)}]({p})\n" for p in plots))
    if dashboard:
        parts.append(_dashboards(dashboard))
    if sweep:
        parts.append(_sweep(sweep, repo_id))
    if run.get("config"):
        parts.append(_config_table(run["config"], secrets))
    text = "\n".join(parts)
    for secret in secrets:  # last line of defence: never render a known secret, whatever field carried it
        if secret:
            text = text.replace(secret, "***")
    return text


def _first(hookpoints: Mapping[str, Mapping[str, Any]], key: str) -> Any:
    return next((cfg[key] for cfg in hookpoints.values() if cfg.get(key)), None)


def num_latents(cfg: Mapping[str, Any]) -> int | None:
    """Dictionary size: `num_latents` when set, else `expansion_factor * d_in` (EleutherAI's convention)."""
    if cfg.get("num_latents"):
        return int(cfg["num_latents"])
    if cfg.get("expansion_factor") and cfg.get("d_in"):
        return int(cfg["expansion_factor"]) * int(cfg["d_in"])
    return None


def _one_or_varies(values: list[Any]) -> str:
    distinct = {v for v in values if v is not None}
    if not distinct:
        return "—"
    if len(distinct) == 1:
        return _fmt(distinct.pop())
    return "varies (see below)"


def _summary_table(names, hookpoints, run, model, dataset) -> str:
    rows = [("Base model", f"`{model}`" if model else "—"), ("Dataset", f"`{dataset}`" if dataset else "—")]
    shown = ", ".join(f"`{n}`" for n in names[:12]) + (
        f", … ({len(names)} in all)" if len(names) > 12 else ""
    )
    rows.append(("Hookpoints", shown))
    rows.append(("Latents per SAE", _one_or_varies([num_latents(hookpoints[n]) for n in names])))
    rows.append(("k (active latents per token)", _one_or_varies([hookpoints[n].get("k") for n in names])))
    if run.get("tokens") is not None:
        rows.append(("Tokens trained", _fmt(run["tokens"])))
    if run.get("steps") is not None:
        rows.append(("Optimizer steps", _fmt(run["steps"])))
    if run.get("wall_time_s") is not None:
        rows.append(("Training wall time", _duration(float(run["wall_time_s"]))))
    if run.get("sae_core_version"):
        rows.append(("sae_core version", str(run["sae_core_version"])))
    return _table(["", ""], rows)


def _load_snippet(repo_id: str | None, names: list[str]) -> str:
    where = repo_id or "path/to/this/folder"
    first = names[0] if names else "layers.0"
    one = "downloads only that folder" if repo_id and not repo_id.startswith("/") else "one hookpoint"
    return (
        "## Load it\n\n```python\n"
        "from sae_core import Sae\n"
        f'saes = Sae.load_many_from_hub("{where}")  # {{hookpoint: Sae}}\n'
        f'sae = Sae.load_from_hub("{where}", hookpoint="{first}")  # {one}\n'
        "```\n"
    )


def _saes_table(names, hookpoints) -> str:
    rows = []
    for name in names:
        cfg = hookpoints[name]
        rows.append(
            (
                f"`{name}`",
                cfg.get("d_in"),
                num_latents(cfg),
                cfg.get("k"),
                cfg.get("expansion_factor"),
                cfg.get("normalize_decoder"),
            )
        )
    header = ["hookpoint", "d_in", "latents", "k", "expansion factor", "normalized decoder"]
    return "## SAEs\n\n" + _table(header, rows)


def _evaluation(report, report_md, plots, names) -> str:
    lines = ["## Evaluation\n"]
    if report:
        settings = report.get("settings") or {}
        said = [f"{key} `{settings[key]}`" for key in ("model", "dataset", "split") if settings.get(key)]
        if settings.get("tokens") is not None:
            said.append(f"{_fmt(settings['tokens'])} tokens")
        if said:
            lines.append("Evaluated on " + ", ".join(said) + ".\n")
        metrics = report.get("hookpoints") or {}
        rows_for = sorted(metrics, key=natural_key)
        columns = [(key, title) for key, title in EVAL_COLUMNS if any(key in metrics[h] for h in rows_for)]
        rows = [[f"`{h}`"] + [metrics[h].get(key) for key, _ in columns] for h in rows_for]
        lines.append(_table(["hookpoint"] + [title for _, title in columns], rows))
        lines.append(
            "FVU: fraction of variance unexplained (1 = mean predictor, 0 = perfect). "
            "L0: latents active per token. "
            "ΔCE: next-token cross-entropy (nats) with the SAE's reconstruction spliced in, "
            "minus the clean one. "
            "Loss recovered: (CE_ablated − CE_spliced) / (CE_ablated − CE_clean), "
            "ablating to zero or to the mean. "
            "KL: from the clean to the spliced next-token distribution. All metrics: `eval/report.json`.\n"
        )
    elif report_md:
        lines.append(report_md.strip() + "\n")
    for plot in plots:
        lines.append(f"![{_stem(plot)}]({plot})\n")
    return "\n".join(lines)


def _dashboards(dashboard: Mapping[str, Sequence[Mapping[str, Any]]], shown: int = 5) -> str:
    """Links to the latent dashboards: the index, and each hookpoint's most frequent latents."""
    rows = []
    for h in sorted(dashboard, key=natural_key):
        top = sorted(dashboard[h], key=lambda r: (-r["density"], r["latent"]))[:shown]
        links = ", ".join(f"[{r['latent']}](dashboard/{r['page']})" for r in top)
        rows.append([f"`{h}`", len(dashboard[h]), links])
    return (
        "## Latent dashboards\n\n"
        "Top-activating contexts, quantile samples, density, activation histogram and logit lens of "
        f"{sum(len(r) for r in dashboard.values())} latents: [dashboard/index.html](dashboard/index.html) "
        "(a static site: download the `dashboard/` folder and open it in a browser; the Hub shows HTML as "
        "source). The same data as JSON: `dashboard/<hookpoint>/<latent>.json`.\n\n"
        + _table(["hookpoint", "latents", "most frequent"], rows)
    )


def _sweep(variants: Sequence[Mapping[str, str]], repo_id: str | None) -> str:
    rows = []
    for v in variants:
        where = v["location"]
        here = where == repo_id
        link = f"[{where}](https://huggingface.co/{where})" if hub_id_or_none(where) and not here else where
        rows.append([v["variant"], f"{link} (this one)" if here else link])
    return (
        "## The sweep\n\nThese SAEs are one variant of a sweep trained in one pass over the same tokens "
        "(`--sweep`/`--init_seeds`; the variant's settings are in its name); each variant is published on "
        "its own:\n\n" + _table(["variant", "published at"], rows)
    )


def _config_table(config: Mapping[str, Any], secrets: Sequence[str]) -> str:
    flat = public_config(config, secrets)
    rows = [(f"`{key}`", value) for key, value in sorted(flat.items())]
    return "## Training configuration\n\n" + _table(["setting", "value"], rows)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:  # a "|" or newline inside a value would break the Markdown table
        return _fmt(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
