"""Latent dashboards: the streaming statistics against a brute-force computation, bad input, and the site in a
real headless Chromium (Debian's, as the UI test drives it)."""

import json
from pathlib import Path

import pytest
import torch

from sae_core import Sae, SaeConfig
from sae_core.dashboard import (
    DashboardConfig,
    build_dashboards,
    collect_latent_stats,
    latent_records,
    logit_lens,
    main,
    residual_role,
)
from sae_core.models import hookpoint_module
from tests.support.browser import Chromium, find_chromium
from tests.support.tiny import WORDS, tiny_model, write_jsonl

BOS = 0
D = 32


def token_ids(n_seq=7, seq_len=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (n_seq, seq_len), generator=g)
    ids[:, 0] = BOS
    ids[2, 11] = BOS  # an excluded token inside a sequence: it shows, without an activation
    return ids


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=3, d=D)


def sae(seed=1, latents=48, k=6):
    torch.manual_seed(seed)
    s = Sae(D, SaeConfig(num_latents=latents, k=k))
    with torch.no_grad():
        s.encoder.bias.add_(0.05)  # more latents fire on random tokens
    return s


def dense_acts(model, sae, hookpoint, ids):
    """Every token's activation of every latent, [n_seq, T, M] (0 where excluded), by one plain forward."""
    out = {}
    handle = hookpoint_module(model, hookpoint).register_forward_hook(
        lambda m, a, o: out.setdefault("x", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = out["x"].reshape(-1, D)
    with torch.no_grad():
        acts, indices, *_ = sae.encode(x)
    dense = torch.zeros(x.shape[0], sae.num_latents).scatter_(1, indices, acts)
    dense = dense.view(*ids.shape, -1)
    dense[ids == BOS] = 0
    return dense


@pytest.mark.parametrize("h", ["layers.1", "layers.1.mlp", "embed_tokens"])  # any hookpoint
def test_statistics_match_a_brute_force_computation(model, h):
    ids, s = token_ids(), sae()
    cfg = DashboardConfig(n_top=4, window_before=5, window_after=3, samples=6, hist_bins=8)
    chosen = torch.tensor([0, 3, 7, 20, 47])
    # Batches of 3 sequences (the last one short): every buffer merges across batches.
    stats = collect_latent_stats(
        model, {h: s}, ids, {h: chosen}, cfg=cfg, exclude_tokens=[BOS], batch_size=3
    )[h]
    dense = dense_acts(model, s, h, ids)
    kept = int((ids != BOS).sum())
    assert stats.tokens == kept
    assert torch.equal(stats.fired, (dense > 0).sum((0, 1)))  # every latent's count, not only the chosen
    records = latent_records(stats, h)
    checked = 0
    for r, latent in zip(records, chosen.tolist(), strict=True):
        a = dense[..., latent]
        fired = a[a > 0]
        assert r["latent"] == latent and r["fired"] == fired.numel()
        assert r["density"] == pytest.approx(fired.numel() / kept)
        if not fired.numel():
            assert r["top_contexts"] == [] and r["quantiles"] == [] and r["mean_activation"] is None
            continue
        checked += 1
        assert r["mean_activation"] == pytest.approx(fired.double().mean().item(), rel=1e-5)
        # Histogram: exact counts at the final bin width, and the largest activation in its upper half.
        w = r["histogram"]["bin_width"]
        expect = torch.bincount(torch.floor(fired.double() / w).long(), minlength=cfg.hist_bins)
        assert r["histogram"]["counts"] == expect.tolist()
        assert cfg.hist_bins * w / 2 <= fired.max().item() < cfg.hist_bins * w
        # Top contexts: the n_top highest peaks of blocks of a window's length, each with its window.
        span = cfg.window
        peaks = []
        for seq in range(ids.shape[0]):
            for start in range(0, ids.shape[1], span):
                value, offset = a[seq, start : start + span].max(0)
                if value > 0:
                    peaks.append((value.item(), seq, start + offset.item()))
        peaks.sort(reverse=True)
        got = [(c["sequence"], c["position"]) for c in r["top_contexts"]]
        # Equal peaks (the same token's embedding at two places) may come in either order.
        assert [c["activation"] for c in r["top_contexts"]] == pytest.approx(
            [v for v, _, _ in peaks[: cfg.n_top]]
        )
        assert len(set(got)) == len(got) and set(got) <= {(seq, pos) for _, seq, pos in peaks}
        for c in r["top_contexts"]:
            seq, pos = c["sequence"], c["position"]
            assert c["activation"] == pytest.approx(a[seq, pos].item())
            lo, hi = max(0, pos - cfg.window_before), min(ids.shape[1], pos + cfg.window_after + 1)
            assert c["token_ids"] == ids[seq, lo:hi].tolist() and c["peak"] == pos - lo
            want = [None if t == BOS else v for t, v in zip(ids[seq, lo:hi].tolist(), a[seq, lo:hi].tolist())]
            assert c["activations"] == pytest.approx(want)
        # Quantile samples: distinct firing tokens, as many as the sample holds, groups in activation order.
        assert r["sample_size"] == min(cfg.samples, fired.numel())
        seen = set()
        values = []
        for q in r["quantiles"]:
            for c in q["contexts"]:
                seq, pos = c["sequence"], c["position"]
                assert c["activation"] == pytest.approx(a[seq, pos].item()) and a[seq, pos] > 0
                assert c["activations"][c["peak"]] == pytest.approx(c["activation"])
                seen.add((seq, pos))
                values.append(c["activation"])
        assert values == sorted(values) and len(seen) == len(values)
    assert checked >= 3  # the test exercised latents that fire


def test_a_transcoders_latents_are_read_from_its_modules_input(model):
    ids, h = token_ids(), "layers.1.mlp"
    torch.manual_seed(2)
    tc = Sae(D, SaeConfig(num_latents=48, k=6, transcode=True))
    with torch.no_grad():
        tc.encoder.bias.add_(0.05)
    stats = collect_latent_stats(model, {h: tc}, ids, {h: torch.arange(48)}, exclude_tokens=[BOS])[h]
    seen = {}
    handle = hookpoint_module(model, h).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    x = seen["x"].reshape(-1, D)[(ids != BOS).reshape(-1)]
    with torch.no_grad():
        acts, indices, *_ = tc.encode(x)
    expected = torch.zeros(tc.num_latents, dtype=torch.long).index_add_(
        0, indices[acts > 0], torch.ones(int((acts > 0).sum()), dtype=torch.long)
    )
    assert torch.equal(stats.fired, expected)  # the MLP's input, not its output, feeds the transcoder


def test_the_sample_is_uniform_over_firing_tokens(model):
    # A latent that fires on every kept token: each token should be sampled about equally often over seeds.
    ids, h = token_ids(n_seq=4, seq_len=12), "layers.0"
    s = sae(latents=4, k=4)
    with torch.no_grad():
        s.encoder.bias.fill_(100.0)
    hits = torch.zeros(ids.shape)
    for seed in range(150):
        cfg = DashboardConfig(
            samples=5, window_before=1, window_after=1, n_quantiles=1, per_quantile=5, seed=seed
        )
        stats = collect_latent_stats(
            model, {h: s}, ids, {h: torch.tensor([0])}, cfg=cfg, exclude_tokens=[BOS]
        )
        for c in latent_records(stats[h], h)[0]["quantiles"][0]["contexts"]:
            hits[c["sequence"], c["position"]] += 1
    kept = ids != BOS
    assert hits[~kept].sum() == 0
    expected = 150 * 5 / kept.sum()  # 17 per token
    assert hits[kept].min() > expected / 3 and hits[kept].max() < expected * 2


@pytest.mark.parametrize(
    "hookpoint, latents, ids, message",
    [
        (
            "layers.1",
            [3, 48],
            token_ids(),
            "latent 48 is out of range: layers.1's SAE has 48 latents (0 .. 47)",
        ),
        ("layers.9", None, token_ids(), "hookpoint 'layers.9' is not in the model"),
        (
            "layers.1",
            None,
            token_ids(seq_len=24),
            "the sequences have 24 tokens, fewer than a context window of 25",
        ),
        ("layers.1", None, torch.zeros(0, 30, dtype=torch.long), "no tokens: the input has no sequences"),
    ],
)
def test_api_bad_input_is_a_one_line_error(model, hookpoint, latents, ids, message):
    from sae_core.errors import SaeCoreError

    chosen = None if latents is None else torch.tensor(latents)
    with pytest.raises(SaeCoreError) as e:
        collect_latent_stats(model, {hookpoint: sae()}, ids, {hookpoint: chosen}, exclude_tokens=[BOS])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_logit_lens_applies_the_final_norm_and_unembedding(model):
    s, latents = sae(), torch.tensor([1, 5])
    values, note = logit_lens(model, s, "layers.2", latents, k=4)
    norm = model.model.norm
    rows = s.W_dec.detach()[latents]
    # RMSNorm by hand: x / sqrt(mean(x^2) + eps) * gamma, then the unembedding (no bias).
    normed = rows / torch.sqrt(rows.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight
    logits = normed @ model.lm_head.weight.detach().T
    top, bottom = logits.topk(4, dim=1), logits.topk(4, dim=1, largest=False)
    assert torch.equal(values["promoted_ids"], top.indices) and torch.equal(
        values["suppressed_ids"], bottom.indices
    )
    assert torch.allclose(values["promoted"], top.values, atol=1e-5)
    assert "residual stream after block 2" in note and "model.norm" in note
    assert "direct path" in residual_role(model, "layers.1.mlp")
    assert "token embeddings" in residual_role(model, "embed_tokens")
    values, note = logit_lens(model, s, "layers.1.post_attention_layernorm", latents)
    assert values is None and "not written into the residual stream" in note


def test_logit_lens_of_a_layernorm_model_leaves_out_the_norms_bias():
    gpt2 = tiny_model("gpt2", n_layers=2, d=D)
    with torch.no_grad():
        gpt2.transformer.ln_f.bias.normal_()  # a bias that would dominate every latent's logits if kept
    s, latents = sae(), torch.tensor([0, 9])
    values, note = logit_lens(gpt2, s, "layers.1", latents, k=5)
    ln, rows = gpt2.transformer.ln_f, s.W_dec.detach()[latents]
    centred = rows - rows.mean(-1, keepdim=True)
    normed = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps) * ln.weight
    logits = normed @ gpt2.lm_head.weight.detach().T
    assert torch.equal(values["promoted_ids"], logits.topk(5, dim=1).indices)
    assert torch.allclose(values["suppressed"], logits.topk(5, dim=1, largest=False).values, atol=1e-5)
    assert "transformer.ln_f" in note
    # GPT-2's own spelling of its blocks (sparsify names its folders so) has the same lens.
    assert "direct path" in residual_role(gpt2, "h.1.mlp") and "block 1" in residual_role(gpt2, "h.1")
    same, _ = logit_lens(gpt2, s, "h.1", latents, k=5)
    assert torch.equal(same["promoted_ids"], values["promoted_ids"])


# ----------------------------------------------------------------------------------------------------------
# A trained run: the command line, bad input, the site in a browser

HOSTILE = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> & "quotes"'


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, tiny_text_file):
    from sae_core.run import main as train

    save_dir = tmp_path_factory.mktemp("runs")
    flags = "--ctx_len 32 --batch_size 4 --expansion_factor 2 --k 4 --layers 0 2 --max_tokens 256"
    flags += " --lr_warmup_steps 1 --device cpu --run_name r"
    train([str(tiny_model_dir), str(tiny_text_file), *flags.split(), "--save_dir", str(save_dir)])
    return save_dir / "r"


@pytest.fixture(scope="module")
def hostile_text(tmp_path_factory):
    """Documents with HTML and script in them, between ordinary words."""
    docs = [" ".join(WORDS[i % 7 : i % 7 + 6]) + " " + HOSTILE + " " + " ".join(WORDS[:5]) for i in range(60)]
    return write_jsonl(tmp_path_factory.mktemp("hostile") / "docs.jsonl", docs)


def run_cli(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    return e.value.code, err.strip().splitlines()[-1] if err.strip() else ""


def test_bad_input_is_one_line(trained_run, tiny_model_dir, tmp_path, capsys):
    base = [str(tiny_model_dir), str(trained_run), "--max_tokens", "128", "--out", str(tmp_path / "d")]
    for extra, message in [
        (["--latents", "0:65"], "latent 64 is out of range: layers.0's SAE has 64 latents (0 .. 63)"),
        (["--latents", "x"], "'x' is not an id or a range a:b"),
        (["--hookpoints", "layers.1"], "it has: layers.0, layers.2"),
        (["--top_firing", "65"], "top_firing 65: layers.0's SAE has 64 latents"),
        (["--ctx_len", "16"], "the sequences have 16 tokens, fewer than a context window of 25"),
        (["--latents", "1", "--random", "3"], "argument --random: not allowed with argument --latents"),
        (["--hist_bins", "7"], "hist_bins must be an even number"),
    ]:
        code, last = run_cli(base + extra, capsys)
        assert code == 2 and last.startswith("error: ") and message in last, (extra, last)
    # An existing folder is refused (before any model is loaded) unless --overwrite.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    code, last = run_cli(base, capsys)
    assert code == 2 and "d exists: pass --overwrite" in last
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"


def test_cli_top_firing_writes_json_and_a_site_that_works_in_chromium(
    trained_run, tiny_model_dir, hostile_text, tmp_path, capsys
):
    out = tmp_path / "dash"
    out.mkdir()  # replaced with --overwrite
    argv = [str(tiny_model_dir), str(trained_run), str(hostile_text), "--hookpoints", "layers.2", "layers.0"]
    argv += [
        "--top_firing",
        "6",
        "--max_tokens",
        "256",
        "--out",
        str(out),
        "--overwrite",
        "--window_before",
        "6",
    ]
    main(argv)
    assert "wrote" in capsys.readouterr().out
    summary = json.loads((out / "dashboard.json").read_text())
    s = summary["settings"]
    assert s["selection"] == "top_firing 6" and s["dataset"] == str(hostile_text) and s["ctx_len"] == 32
    assert "other than the training one" in s["held_out"]
    assert list(summary["hookpoints"]) == ["layers.0", "layers.2"]
    # The 6 most frequent latents: the same densities as a full collection of every latent would rank first.
    records = build_dashboards(
        str(tiny_model_dir), str(trained_run), str(hostile_text), hookpoints="layers.0", latents="0:64",
        max_tokens=256, cfg=DashboardConfig(window_before=6),
    )["layers.0"]  # fmt: skip
    best = sorted(records, key=lambda r: (-r["density"], r["latent"]))[:6]
    rows = summary["hookpoints"]["layers.0"]
    assert sorted(r["latent"] for r in rows) == sorted(r["latent"] for r in best)
    assert {r["latent"]: r["density"] for r in rows} == {r["latent"]: r["density"] for r in best}
    latent = max(rows, key=lambda r: (r["density"], -r["latent"]))["latent"]
    record = json.loads((out / "layers.0" / f"{latent}.json").read_text())
    assert record == next(r for r in records if r["latent"] == latent)
    assert record["logit_lens"] is not None and len(record["logit_lens"]["promoted"]) == 10

    # Dataset text is escaped: no tag from the documents survives in any page.
    pages = list(out.rglob("*.html"))
    assert len(pages) == 1 + 2 * 6
    for page in pages:
        text = page.read_text()
        assert "<script>window" not in text and "<img" not in text and 'onerror="' not in text
    assert any("&lt;" in p.read_text() for p in pages)

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/install.sh installs it with apt-get)")
    browser = Chromium(chromium, tmp_path / "browser")
    try:
        browser.goto((out / "index.html").as_uri())
        browser.wait_for_text("Latent dashboards", "layers.0", "layers.2")
        table = "[...document.querySelectorAll('tr[data-latent]')]"
        visible = f"{table}.filter(r => !r.hidden).map(r => r.dataset.latent)"
        assert len(browser.evaluate(visible)) == 12
        browser.evaluate(
            f"(() => {{ const b = document.getElementById('search'); b.value = '{latent}';"
            " b.dispatchEvent(new Event('input')); })()"
        )
        shown = browser.evaluate(visible)
        assert shown and set(shown) == {str(latent)}, shown
        assert "shown" in browser.evaluate("document.getElementById('status').textContent")

        browser.goto((out / "layers.0" / f"{latent}.html").as_uri())
        browser.wait_for_text(f"latent {latent}", "Top activations", "Logit lens")
        top = record["top_contexts"][0]
        peak = browser.evaluate(
            "(() => { const s = document.querySelector('#top tr .peak');"
            " return [s.textContent, getComputedStyle(s).backgroundColor, s.title]; })()"
        )
        assert peak[0] == top["tokens"][top["peak"]].replace("\n", "\u23ce")
        assert peak[1] in ("rgb(255, 140, 0)", "rgba(255, 140, 0, 1)"), peak  # the strongest highlight
        assert float(peak[2]) == pytest.approx(top["activation"], rel=1e-3)
        assert browser.evaluate("document.querySelectorAll('#top tr').length") == len(record["top_contexts"])
        assert browser.evaluate("document.querySelector('svg rect') !== null")
        # No script from the dataset ran, on this page or the index.
        assert browser.evaluate("typeof window.pwned") == "undefined"
    finally:
        assert browser.close() == []


# ----------------------------------------------------------------------------------------------------------
# Publishing: the dashboards go into the repo under dashboard/, and the card links them

TOKEN = "hf_AliceWriteToken0123456789abcdef"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tests.support.hub_server import HubServer

    # As in test_hub.py: the client talks to the server on 127.0.0.1 only, with its cache in tmp_path.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    server = HubServer(tmp_path / "hub-storage", tokens={TOKEN: "alice"}).start()
    yield server
    server.stop()


def test_publish_includes_the_dashboards_and_the_card_links_them(trained_run, tiny_model_dir, hub, tmp_path):
    import shutil

    from huggingface_hub import HfApi

    from sae_core.errors import HubError
    from sae_core.hub import publish

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("trainer_state"))
    build_dashboards(str(tiny_model_dir), str(run), latents="0:3", max_tokens=128, out_dir=run / "dashboard")
    repo = "alice/dashboards"
    publish(run, repo, token=TOKEN, endpoint=hub.url)
    api = HfApi(endpoint=hub.url, token=TOKEN)
    files = set(api.list_repo_files(repo))
    expected = {"dashboard/index.html", "dashboard/dashboard.json"}
    expected |= {
        f"dashboard/{h}/{i}.{ext}"
        for h in ("layers.0", "layers.2")
        for i in range(3)
        for ext in ("html", "json")
    }
    assert expected <= files
    text = Path(api.hf_hub_download(repo, "README.md", cache_dir=tmp_path / "dl")).read_text()
    assert "## Latent dashboards" in text and "[dashboard/index.html](dashboard/index.html)" in text
    assert "| `layers.0` | 3 |" in text and "(dashboard/layers.2/" in text

    # Published again without dashboards: the old ones leave the repo in the same commit.
    shutil.rmtree(run / "dashboard")
    publish(run, repo, token=TOKEN, endpoint=hub.url)
    assert not any(f.startswith("dashboard/") for f in api.list_repo_files(repo))
    with pytest.raises(HubError, match="not a latent dashboard folder") as e:
        publish(run, repo, token=TOKEN, endpoint=hub.url, dashboard_dir=run)
    assert "\n" not in str(e.value)
