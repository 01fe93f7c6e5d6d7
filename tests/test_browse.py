"""The feature browser (launch.browse) and launch.eval on any run: streaming statistics against
a brute-force reference, then the pages opened in a real headless Chromium."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from launch import browse as browse_cli
from launch import eval as eval_cli
from launch import train as train_cli
from sae_jax.evaluation.features import CountTable, StreamingTopK

CHROMIUM = Path("/usr/bin/chromium")


def test_streaming_topk_equals_a_full_sort():
    rng = np.random.default_rng(0)
    groups, k = 50, 4
    top = StreamingTopK(groups, k)
    g_all, s_all = [], []
    for b in range(6):  # batches with repeated groups and ties
        g = rng.integers(0, groups - 5, 300)  # the last 5 groups never appear
        s = rng.integers(0, 40, 300).astype(np.float32)
        top.add(g, s, np.arange(b * 300, (b + 1) * 300))
        g_all.append(g)
        s_all.append(s)
    g_all, s_all = np.concatenate(g_all), np.concatenate(s_all)
    for group in range(groups):
        items, values = top.get(group)
        mine = np.flatnonzero(g_all == group)
        want = mine[np.lexsort((mine, -s_all[mine]))][:k]  # best first, earlier item on ties
        np.testing.assert_array_equal(items, want)
        np.testing.assert_array_equal(values, s_all[want])
    table = CountTable()
    table.add(np.array([3, 1, 3]))
    table.add(np.array([1, 7]))
    assert table.keys.tolist() == [1, 3, 7] and table.counts.tolist() == [2, 2, 1]


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium (Debian's) driven by Playwright; yields a page factory."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing (.ci/run installs Debian's chromium)")
        pytest.skip("needs Debian's chromium")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


class Page:
    """A browser tab that records console errors and uncaught exceptions."""

    def __init__(self, browser):
        self.page = browser.new_page()
        self.errors = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: r.url.startswith("file://") or self.errors.append(r.url))

    def open(self, url: str):
        self.page.goto(url)
        self.ready()

    def ready(self):
        self.page.wait_for_selector("body[data-ready]", timeout=20000)

    def follow(self, selector: str):
        with self.page.expect_navigation():
            self.page.click(selector)
        self.ready()

    def contexts(self, where: str) -> list[tuple[int, float]]:
        return [(int(c.get_attribute("data-token")), float(c.get_attribute("data-act")))
                for c in self.page.query_selector_all(f"{where} .ctx")]  # fmt: skip


def _shown_top(page: Page, stats, latent: int):
    items, values = stats.top.get(latent)
    shown = page.contexts("#top")
    assert [t for t, _ in shown] == items.tolist()
    np.testing.assert_allclose([a for _, a in shown], values, rtol=1e-3, atol=1e-4)
    return items


def export_random_sae(out: Path, d: int, experts: int, latents: int, k: int) -> None:
    """An exported SAE with random weights (unit decoder rows), as training would write it."""
    from sae_jax.config import SAEConfig
    from sae_jax.export import export_sae

    rng = np.random.default_rng(0)
    per = latents // experts
    w = rng.normal(size=(experts, per, d)).astype(np.float32)
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    params = {"w_enc": w, "w_dec": w.copy(), "b_enc": np.zeros((experts, per), np.float32),
              "b_dec": np.zeros(d, np.float32), "b_router": np.zeros(d, np.float32),
              "w_router": rng.normal(size=(d, experts)).astype(np.float32)}  # fmt: skip
    cfg = SAEConfig(d=d, num_latents=latents, num_experts=experts, k=k, k_aux=0)
    export_sae(params, cfg.validate(), out)


def test_text_browser_in_chromium(tmp_path, tiny_model, text, chromium, capsys):
    """Dump (with token ids) -> an SAE -> browse: overview -> expert -> latent in Chromium; the
    top contexts shown are the library's, with the tokens' text; look-ups; an old dump."""
    pytest.importorskip("transformers")
    from sae_jax.browser import build_browser
    from sae_jax.data.dumper import dump, load_tokenizer

    acts = tmp_path / "acts"
    dump(str(tiny_model), 1, text, acts, max_tokens=600, seq_len=16, batch_size=8,
         shard_tokens=300, dtype="float32", device="cpu", progress=False)  # fmt: skip
    export_random_sae(tmp_path / "run" / "export", d=32, experts=4, latents=64, k=4)
    index, got = build_browser(tmp_path / "run", str(acts), tokens=600, batch_size=256, top_k=6,
                               log=lambda _: None)  # fmt: skip
    stats = got.stats
    tok = load_tokenizer(str(tiny_model))

    page = Page(chromium)
    page.open(index.as_uri())
    assert page.page.query_selector("#note") is None  # text: nothing to re-dump
    page.follow("a.expert-link >> nth=1")
    assert page.page.url.endswith("expert.html#1")
    assert len(page.contexts("#routed")) == len(stats.expert_top.get(1)[0])
    page.follow("table.latents a.latent-link")  # the expert's most frequent latent
    latent = int(page.page.url.rsplit("#", 1)[1])
    assert latent // 16 == 1 and stats.fired[latent] > 0
    items = _shown_top(page, stats, latent)
    centre = page.page.query_selector("#top .ctx .center").text_content()
    assert centre == tok.decode([int(got.token_ids[items[0]])]).replace("\n", "\u21b5")
    assert len(page.page.query_selector_all("#effects .keys span")) == 20  # tiny model's vocab
    # look-up by latent id and by token text
    page.page.goto(index.as_uri())
    page.ready()
    page.page.fill("#latent-id", "5")
    with page.page.expect_navigation():
        page.page.press("#latent-id", "Enter")
    page.ready()
    _shown_top(page, stats, 5)
    page.page.goto(index.as_uri())
    page.ready()
    word_id = int(got.token_ids[items[0]])
    page.page.fill("#token-text", tok.decode([word_id]))
    page.page.click("#token-form button")
    page.page.wait_for_selector("#token-results tr.hit")
    hits = " ".join(r.text_content() for r in page.page.query_selector_all("#token-results tr"))
    pairs, counts = stats.latent_keys.keys, stats.latent_keys.counts  # id * M + latent
    mine = pairs // 64 == word_id
    assert f"#{pairs[mine][np.argmax(counts[mine])] % 64} " in hits  # its most frequent latent
    pairs, counts = stats.expert_keys.keys, stats.expert_keys.counts  # id * N + expert
    mine = pairs // 4 == word_id
    assert f"expert {pairs[mine][np.argmax(counts[mine])] % 4} " in hits
    assert page.errors == []

    # A dump from before token ids (manifest version 1) still evaluates; the browser says why
    # it shows no text.
    old = tmp_path / "old"
    shutil.copytree(acts, old, ignore=shutil.ignore_patterns("token_ids"))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["version"] = 1
    for entry in manifest["shards"]:
        del entry["token_ids"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    args = ["--workdir", str(tmp_path / "run"), "--data", str(old), "--no_lm", "--no_plots"]
    assert eval_cli.main([*args, "--batch_size", "256"]) == 0
    assert browse_cli.main(["--workdir", str(tmp_path / "run"), "--data", str(old),
                            "--tokens", "300", "--no_model", "--no_duplicates"]) == 0  # fmt: skip
    page.open(index.as_uri())
    assert "re-dump" in page.page.query_selector("#note").text_content()
    assert "not searched" in page.page.text_content("main")
    page.open(index.as_uri().replace("index.html", "latent.html#" + str(latent)))
    assert page.page.query_selector("#top .ctx .center") is None  # positions, no text
    assert page.errors == []


def test_eval_and_browse_a_synthetic_quick_run(tmp_path, chromium, capsys):
    """The quick start's kind of run (default.gin, synthetic data): launch.eval with no --data
    regenerates its eval data from the seed; the browser shows planted features."""
    run = tmp_path / "run"
    code = train_cli.main([f"--workdir={run}", "--gin.STEPS=6", "--gin.BATCH_SIZE=256",
                           "--gin.NUM_LATENTS=128", "--gin.TrainConfig.eval_tokens=1024",
                           "--gin.LOG_EVERY=2", "--no_progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert eval_cli.main(["--workdir", str(run), "--tokens", "1024", "--batch_size", "256"]) == 0
    out = capsys.readouterr().out
    for name in ("training_curves.png", "expert_load.png", "latent_frequency.png"):
        assert f"wrote {run / name}" in out
    result = json.loads((run / "eval.json").read_text())
    last = [json.loads(line) for line in (run / "metrics.jsonl").open()][-1]
    # the same eval tokens as training's final eval (batches 0-3 of 256); no drops there
    assert last["eval/drop_fraction"] == 0
    assert result["fvu_dropless"] == pytest.approx(last["eval/fvu"], rel=1e-4)
    assert result["feature_recovery"] == last["eval/feature_recovery"]
    assert "outlier_fraction" not in result and result["data"].startswith("synthetic")

    from sae_jax.browser import build_browser

    index, got = build_browser(run, tokens=1024, batch_size=256, log=lambda _: None)
    latent = int(np.argmax(got.stats.fired))
    page = Page(chromium)
    page.open(index.as_uri().replace("index.html", f"latent.html#{latent}"))
    items = _shown_top(page, got.stats, latent)
    first = page.page.query_selector("#top .ctx").text_content()
    for f in got.planted[items[0]][got.planted[items[0]] >= 0]:
        assert f"f{f} " in first
    assert page.page.query_selector_all("table td")[0].text_content().startswith("f")
    assert page.errors == []
