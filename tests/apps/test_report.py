"""gradindex report: the page's content against answers computed independently, and a real headless Chromium."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gradindex
from gradindex.apps.html_report import histogram_counts, png_bytes, render_input, to_pixels
from gradindex.checkpoints import load_into
from gradindex.cli import cli
from gradindex.tasks import digits_with_info
from gradindex.training import TrainConfig, train

TASK_FILE = "import gradindex.tasks\n\ndef task():\n    return gradindex.tasks.digits(flip_fraction=0.1, seed=0)\n"


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """A real store: sklearn digits with 10% flipped labels, an MLP trained 5 epochs, 2 checkpoints."""
    root = tmp_path_factory.mktemp("digits-report")
    (root / "task.py").write_text(TASK_FILE)
    task, noise = digits_with_info(flip_fraction=0.1, seed=0)
    checkpoints = train(task, TrainConfig(epochs=5, lr=0.05, n_checkpoints=2), root / "checkpoints")
    store = gradindex.build(
        f"{root / 'task.py'}:task",
        [f"{c.path}:{c.lr}" for c in checkpoints],
        root / "digits.gradindex",
        proj_dim=64,
        progress=False,
    )
    (root / "results.json").write_text(
        json.dumps({"self_influence": {"auc": 0.987654, "ap": 0.9}, "random": {"auc": 0.5}, "build_seconds": 1.25})
    )
    return {"store": store, "task": task, "noise": noise, "checkpoints": checkpoints, "root": root}


class _Page(html.parser.HTMLParser):
    """The parts of a report page the tests read: cards per grid, images, histogram bars, links."""

    def __init__(self):
        super().__init__()
        self.grids: list[list[dict]] = []
        self.grid_kinds: list[str] = []
        self.images: list[str] = []
        self.bars: list[dict] = []
        self.urls: list[str] = []
        self.meta: list[dict] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "div" and "grid" in classes:
            self.grids.append([])
            self.grid_kinds.append(" ".join(c for c in classes if c != "grid"))
        if tag == "figure" and "card" in classes:
            self.grids[-1].append(attrs) if self.grids else None
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "rect" and "bar" in classes and "data-count" in attrs:
            self.bars.append(attrs)
        for key in ("src", "href", "action", "data"):
            if key in attrs and tag not in ("img",):
                self.urls.append(attrs[key])
        if tag == "meta":
            self.meta.append(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _predictions(task, checkpoint, inputs: torch.Tensor) -> np.ndarray:
    model = load_into(task.model(), checkpoint).eval()
    with torch.no_grad():
        return model(inputs).argmax(dim=1).numpy()


# ---- pictures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (6, 4, 3), (4, 9, 4)])
def test_png_bytes_decode_to_the_same_pixels_in_pillow(shape):
    Image = pytest.importorskip("PIL.Image")
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(pixels))))
    np.testing.assert_array_equal(decoded, pixels)


def test_png_bytes_rejects_what_is_not_an_image():
    with pytest.raises(ValueError, match="needs uint8 pixels"):
        png_bytes(np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"got shape \[4, 4, 2\]"):
        png_bytes(np.zeros((4, 4, 2), dtype=np.uint8))


def test_to_pixels_scaling_and_downsampling():
    np.testing.assert_array_equal(
        to_pixels(np.array([[0.0, 0.5], [1.0, 0.25]])), [[0, 128], [255, 64]]
    )  # [0, 1]: absolute
    np.testing.assert_array_equal(to_pixels(np.array([[-1.0, 0.0], [1.0, 0.5]])), [[0, 128], [255, 191]])  # [-1, 1]
    np.testing.assert_array_equal(to_pixels(np.array([[-3.0, 1.0], [5.0, 2.0]])), [[0, 128], [255, 159]])  # stretched
    big = np.arange(200 * 200, dtype=np.float64).reshape(200, 200) % 2  # 0/1 columns alternate
    small = to_pixels(big)
    assert small.shape == (66, 66)  # 3x3 block means: 200 // 3
    expected = np.round(
        np.array([[1, 2, 1] * 22] * 66)[:, :66] / 3 * 255
    )  # block of columns [even, odd, even] -> 1/3 or 2/3
    blocks = (np.arange(198).reshape(66, 3) % 2).mean(axis=1) * 255
    np.testing.assert_array_equal(small[0], np.round(blocks).astype(np.uint8))
    assert expected.shape == (66, 66)


@pytest.mark.parametrize(
    "value, kind, needle",
    [
        (torch.rand(64), "image", 'alt="input 64"'),  # 8x8 digits as a flat vector
        (torch.rand(1, 8, 8), "image", 'alt="input 1x8x8"'),
        (torch.rand(3, 16, 16), "image", 'alt="input 3x16x16"'),
        (np.random.rand(16, 16, 3).astype(np.float32), "image", 'alt="input 16x16x3"'),
        (torch.rand(40), "signal", "signal of length 40"),  # MNIST-1D
        (torch.rand(1, 40), "signal", "signal of length 40"),
        (torch.tensor([5, 9, 2]), "text", "5 9 2"),  # token ids
        ("a plain sentence", "text", "a plain sentence"),
    ],
)
def test_inputs_render_by_their_shape(value, kind, needle):
    snippet, found = render_input(value, None)
    assert found == kind and needle in snippet, snippet[:200]


def test_tokens_are_decoded_when_the_dataset_can():
    snippet, kind = render_input(torch.tensor([1, 2]), lambda ids: " ".join({1: "hello", 2: "<world>"}[i] for i in ids))
    assert kind == "text" and "hello &lt;world&gt;" in snippet


def test_histogram_counts_match_numpy():
    scores = np.array([1e-3, 2e-3, 1e-2, 0.1, 1.0, 3.0, 10.0])
    groups = np.array([0, 0, 0, 1, 0, 1, 1])
    edges, counts, log_scale = histogram_counts(scores, groups, bins=4)
    assert log_scale
    np.testing.assert_allclose(edges, np.linspace(-3, 1, 5))
    np.testing.assert_array_equal(counts, [[2, 1, 0, 1], [0, 0, 1, 2]])
    _, linear, log_scale = histogram_counts(np.array([1.0, 2.0, 3.0]), None, bins=2)
    assert not log_scale and linear.tolist() == [[1, 2]]


# ---- the page -----------------------------------------------------------------------------------------


def test_report_shows_the_ranking_predictions_queries_and_quality(digits_store, tmp_path):
    store, task, _noise = digits_store["store"], digits_store["task"], digits_store["noise"]
    output = tmp_path / "report.html"
    summary = gradindex.report(store, output=output, queries=[0, 5], k=3, top=10, progress=False)
    page = _parse(output)

    expected_top = gradindex.self_influence(store, top=10).column("row").to_pylist()
    kinds = dict(zip(page.grid_kinds, page.grids))
    suspects = kinds["suspects"]
    assert [int(card["data-row"]) for card in suspects] == expected_top == summary["suspects"]
    inputs, given = task.train.tensors
    predicted = _predictions(task, digits_store["checkpoints"][-1].path, inputs)
    assert [int(card["data-predicted"]) for card in suspects] == predicted[expected_top].tolist()
    assert [int(card["data-given"]) for card in suspects] == given.numpy()[expected_top].tolist()

    proponent_grids = [grid for kind, grid in zip(page.grid_kinds, page.grids) if kind == "proponents"]
    opponent_grids = [grid for kind, grid in zip(page.grid_kinds, page.grids) if kind == "opponents"]
    for position, query_id in enumerate([0, 5]):
        for grid, opponents in ((proponent_grids[position], False), (opponent_grids[position], True)):
            expected = (
                gradindex.query(store, split="test", samples=[query_id], k=3, opponents=opponents)
                .column("row")
                .to_pylist()
            )
            assert [int(card["data-row"]) for card in grid] == expected

    # one picture per card: 10 suspects + 2 queries + 2 x (3 proponents + 3 opponents)
    assert summary["pictures"] == len(page.images) == 10 + 2 + 12
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"

    # the histogram: every sample once, split by the model's disagreement with the given label
    counts = {0: 0, 1: 0}
    for bar in page.bars:
        counts[int(bar["data-group"])] += int(bar["data-count"])
    disagree = int((predicted != given.numpy()).sum())
    assert counts == {0: store.n_samples - disagree, 1: disagree}

    text = output.read_text()
    assert "model disagrees with the given label" in text
    assert "0.988" in text and "build_seconds" in text  # results.json beside the store
    assert summary["quality"] == str(digits_store["root"] / "results.json")
    assert page.sections == ["self-influence", "suspects", "queries", "quality", "manifest"]
    assert '"format": "gradindex/1"' in text.replace("&quot;", '"')
    # nothing to fetch: a CSP that forbids it and no URL that could need it
    csp = next(meta["content"] for meta in page.meta if meta.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "img-src data:" in csp
    assert all(url.startswith("#") for url in page.urls), page.urls
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text)


def test_known_noise_splits_the_histogram_and_marks_cards(digits_store, tmp_path):
    store, noise = digits_store["store"], digits_store["noise"]
    output = tmp_path / "known.html"
    summary = gradindex.report(
        store, output=output, queries="none", top=20, known_noisy=noise.flipped_rows, results={"note": "given"}
    )
    page = _parse(output)
    counts = {0: 0, 1: 0}
    for bar in page.bars:
        counts[int(bar["data-group"])] += int(bar["data-count"])
    assert counts == {0: store.n_samples - noise.n_flipped, 1: noise.n_flipped}
    flagged = [int(card["data-row"]) for card in page.grids[0] if "flagged" in card["class"]]
    assert flagged == [row for row in summary["suspects"] if row in set(noise.flipped_rows.tolist())]
    assert len(flagged) >= 10  # self-influence finds flipped labels: most of the top 20 are flipped (chance: 2)
    assert summary["queries"] == [] and "queries" not in page.sections
    assert summary["quality"] == "given"


def test_without_a_task_the_page_still_has_ranking_and_manifest(tmp_path, mlp_checkpoints):
    import tiny_tasks

    store = gradindex.build(
        tiny_tasks.mlp_task(), mlp_checkpoints, tmp_path / "object.gradindex", proj_dim=16, progress=False
    )
    summary = gradindex.report(store, output=tmp_path / "r.html", top=5)
    assert summary["pictures"] == 0 and summary["predictions"] is False and summary["queries"] == []
    assert summary["notes"] == [
        "the store does not record its task; pass --task SPEC to see inputs, predictions and queries"
    ]
    page = _parse(tmp_path / "r.html")
    assert [int(card["data-row"]) for card in page.grids[0]] == gradindex.self_influence(store, top=5).column(
        "row"
    ).to_pylist()
    with pytest.raises(gradindex.TaskSpecError, match="does not record its task; pass --task SPEC to query"):
        gradindex.report(store, output=tmp_path / "q.html", queries=[0])
    # with the task given, the 12-feature inputs (not a square, not an image) are drawn as sparklines
    summary = gradindex.report(store, tiny_tasks.mlp_task(), output=tmp_path / "t.html", top=4, queries=[1], k=2)
    assert summary["pictures"] == 4 + 1 + 4 and summary["predictions"] is True
    assert summary["quality"] is None


def test_report_rejects_bad_arguments(digits_store, tmp_path):
    store = digits_store["store"]
    with pytest.raises(ValueError, match="top must be a positive integer, got 0"):
        gradindex.report(store, output=tmp_path / "x.html", top=0)
    with pytest.raises(ValueError, match=r"query samples \[9999\] are out of range"):
        gradindex.report(store, output=tmp_path / "x.html", queries=[9999])
    with pytest.raises(gradindex.ArgumentError, match="results .*nope.json does not exist"):
        gradindex.report(store, output=tmp_path / "x.html", queries="none", results=tmp_path / "nope.json")
    with pytest.raises(ValueError, match="output .* is a directory; give a file name"):
        gradindex.report(store, output=tmp_path, queries="none")


def test_report_command(digits_store, tmp_path):
    runner = CliRunner()
    output = tmp_path / "cli.html"
    result = runner.invoke(
        cli,
        [
            "-q",
            "report",
            str(digits_store["store"].path),
            "--queries",
            "1",
            "-k",
            "2",
            "--top",
            "3",
            "-o",
            str(output),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(output) and summary["queries"] == [1] and len(summary["suspects"]) == 3
    assert summary["pictures"] == 3 + 1 + 4 and output.stat().st_size == summary["bytes"]
    text = runner.invoke(
        cli, ["-q", "report", str(digits_store["store"].path), "--queries", "none", "--top", "2", "-o", str(output)]
    )
    assert text.exit_code == 0 and "wrote" in text.stderr and "2 suspects, 0 queries, 2 pictures" in text.stderr
    bad = runner.invoke(cli, ["report", str(digits_store["store"].path), "--queries", "1-x", "-o", str(output)])
    assert bad.exit_code == 1 and "--samples '1-x' must be indices and ranges" in bad.output
    usage = runner.invoke(cli, ["report", str(digits_store["store"].path), "--top", "0"])
    assert usage.exit_code == 2 and "0 is not in the range x>=1" in usage.output
    missing = runner.invoke(cli, ["report", str(tmp_path / "none.gradindex")])
    assert missing.exit_code == 1 and "no gradindex store at" in missing.output


# ---- a real browser -----------------------------------------------------------------------------------

CHROMIUM = os.environ.get("GRADINDEX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _browser():
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(
            f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium` (as .ci/run does) or set "
            "GRADINDEX_CHROMIUM"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python driver is missing: pip install -e '.[test]'")
    return sync_playwright


def test_the_page_renders_in_headless_chromium_with_its_images(digits_store, tmp_path):
    sync_playwright = _browser()
    output = tmp_path / "browser.html"
    gradindex.report(digits_store["store"], output=output, queries=[0], k=3, top=8)
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900}, device_scale_factor=1)
            page.on(
                "console",
                lambda message: (
                    problems.append(f"console {message.type}: {message.text}")
                    if message.type in ("error", "warning")
                    else None
                ),
            )
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: problems.append(f"failed request: {request.url}"))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(output.as_uri(), wait_until="load")
            assert page.evaluate("document.documentElement.getAttribute('data-ready')") == "1"  # the inline script ran
            loaded = page.evaluate(
                "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
            )
            assert loaded == [[True, 8, 8]] * (8 + 1 + 6)
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            keep = os.environ.get("GRADINDEX_SCREENSHOT_DIR")
            if keep:
                shutil.copy(shot, Path(keep) / "report.png")
            # the first suspect's thumbnail, as the browser drew it, is that training image
            first = page.locator("#suspects img.thumb").first
            drawn = first.screenshot()
            row = int(page.locator("#suspects figure.card").first.get_attribute("data-row"))
            # clicking enlarges it (the inline script works)
            first.click()
            assert "big" in first.get_attribute("class")
        finally:
            browser.close()
    assert problems == []
    assert requests == [output.as_uri()]  # the page itself, nothing else
    Image = pytest.importorskip("PIL.Image")
    drawn = np.asarray(Image.open(io.BytesIO(drawn)).convert("L"), dtype=np.float64)
    height, width = drawn.shape
    assert abs(height - 96) <= 1 and abs(width - 96) <= 1  # 96 CSS pixels (give or take subpixel placement)
    centres_y = ((np.arange(8) + 0.5) * height / 8).astype(int)
    centres_x = ((np.arange(8) + 0.5) * width / 8).astype(int)
    cells = drawn[np.ix_(centres_y, centres_x)]  # the centre of each of the 8x8 upscaled pixels
    expected = to_pixels(digits_store["task"].train.tensors[0][row].numpy().reshape(8, 8)).astype(np.float64)
    assert np.abs(cells - expected).max() <= 3, (cells, expected)
    assert expected.std() > 30  # a digit, not a blank square
    full = np.asarray(Image.open(shot).convert("L"))
    assert full.shape[1] == 1200 and full.shape[0] > 900
