"""`divrl inspect`: the HTML page of one step's recorded samples (divrl.inspect_page).

The page tests without a browser check the file (self-contained, escaped, the error cases); the
browser tests open it in headless Chromium and are skipped where selenium, chromium or
chromedriver is missing.
"""

import argparse
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from divrl import inspect_page

LABEL = "KL(πθ ‖ π_ref)"
SCRIPT_TOKEN = "</script><script>window.__pwned = 1</script>"
STEP_10 = [  # reward order 0, 2, 1; total-divergence order 1, 0, 2
    {
        "prompt": "What is 3 + 4?",
        "completion": "The answer is 7.",
        "reward": 1.0,
        "passed": True,
        "advantage": 0.71,
        "tokens": ["The", " answer", " is", " 7", "."],
        "divergence": [0.01, 0.002, 0.0, 0.3, 0.05],
        "entropy": [1.2, 0.4, 0.1, 2.0, 0.3],
    },
    {
        "prompt": "Say <b>\nthen stop",
        "completion": None,
        "reward": 0.0,
        "passed": False,
        "advantage": -0.71,
        "tokens": ["<b>&", "\n", " ", "x\ny", SCRIPT_TOKEN, ""],
        "divergence": [0.9, 0.1, 0.0, 0.5, 1.2, 0.0],
        "entropy": [0.2, 0.3, 0.0, 1.0, 0.5, 0.1],
    },
    {
        "prompt": "What is 3 + 5?",
        "completion": "Maybe 8",
        "reward": 0.5,
        "passed": False,
        "advantage": 0.0,
        "tokens": ["Maybe", " 8"],
        "divergence": [0.2, 0.1],
        "entropy": [0.5, None],
    },
]


def _write_run(run: Path, label=LABEL, step_10=STEP_10, metrics=True) -> Path:
    (run / "inspect").mkdir(parents=True)
    step_10 = [dict(s, completion="".join(s["tokens"])) if s["completion"] is None else s for s in step_10]
    records = {
        10: {"step": 10, "divergence": label, "samples": step_10},
        20: {"step": 20, "divergence": label, "samples": step_10[:1]},
    }
    for step, record in records.items():
        (run / "inspect" / f"step-{step}.json").write_text(json.dumps(record))
    if metrics:
        rows = [{"step": s, "reward": s / 20, "kl": 0.01 * s, "entropy": 2.0 - s / 20} for s in range(1, 21)]
        rows[9]["eval_pass@1"] = 0.4
        rows[19]["eval_pass@1"] = 0.6
        (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    inspect_page.add_parser(sub)
    args = parser.parse_args(["inspect", *map(str, argv)])
    return args.func(args)


def _data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


@pytest.fixture
def run_dir(tmp_path):
    return _write_run(tmp_path / "my-run")


def test_latest_step_to_default_out(run_dir, capsys):
    assert _cli(run_dir) == 0
    path = run_dir / "inspect" / "inspect-step-20.html"
    assert capsys.readouterr().out.strip() == str(path)
    page = path.read_text()
    assert 'id="run">my-run<' in page and 'id="step">20<' in page
    assert len(_data(page)["samples"]) == 1


def test_step_and_out(run_dir, tmp_path, capsys):
    out = tmp_path / "pages" / "here"
    assert _cli(run_dir, "--step", 10, "--out", out) == 0
    path = out / "inspect-step-10.html"
    assert capsys.readouterr().out.strip() == str(path)
    page = path.read_text()
    data = _data(page)
    assert data["step"] == 10 and data["label"] == LABEL and data["hasDiv"]
    assert [s["r"] for s in data["samples"]] == [1.0, 0.0, 0.5]
    assert [s["dt"] for s in data["samples"]] == pytest.approx([0.362, 2.7, 0.3])
    assert data["samples"][2]["e"] == [0.5, None] and data["samples"][2]["em"] == 0.5
    assert "KL(πθ ‖ π_ref)" in page  # header label
    for select, options in (("view", ["divergence", "entropy", "advantage"]), ("sort", ["reward", "divergence"])):
        block = re.search(rf'<select id="{select}">(.*?)</select>', page).group(1)
        values = re.findall(r'value="([^"]+)"', block)
        assert values[: len(options)] == options and " disabled" not in block
    # curves: reward (with eval_pass@1), KL and entropy, the step marked and its values given
    assert page.count('<svg class="curve"') == 3 and page.count("<polyline") == 4
    assert "reward = 0.5 at step 10" in page and "eval_pass@1 = 0.4 at step 10" in page


def test_page_is_self_contained(run_dir):
    assert _cli(run_dir, "--step", 10) == 0
    page = (run_dir / "inspect" / "inspect-step-10.html").read_text()
    assert not re.search(r"""\b(?:src|href|xlink:href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "<script src" not in page and "<img" not in page
    assert page.count("<script") == 2  # the data and the code, both inline


def test_tokens_are_escaped(run_dir):
    assert _cli(run_dir, "--step", 10) == 0
    page = (run_dir / "inspect" / "inspect-step-10.html").read_text()
    assert "<b>" not in page and "<b>&" not in page and SCRIPT_TOKEN not in page
    assert "__pwned" in page and page.count("</script>") == 2
    tokens = _data(page)["samples"][1]["t"]
    assert tokens == ["<b>&", "\n", " ", "x\ny", SCRIPT_TOKEN, ""]


def test_escaped_label_and_run_name(tmp_path):
    run = _write_run(tmp_path / "a<b>&c", label="D(<p>&q)")
    assert _cli(run) == 0
    page = (run / "inspect" / "inspect-step-20.html").read_text()
    assert "a&lt;b&gt;&amp;c" in page and "D(&lt;p&gt;&amp;q)" in page
    assert "<p>&q" not in page and "a<b>&c" not in page


def test_run_without_reference(tmp_path):
    samples = [dict(s, divergence=None) for s in STEP_10]
    run = _write_run(tmp_path / "run", label=None, step_10=samples)
    assert _cli(run, "--step", 10) == 0
    page = (run / "inspect" / "inspect-step-10.html").read_text()
    assert 'id="no-divergence"' in page and "unavailable" in page
    assert '<option value="divergence" disabled>' in page
    assert '<option value="entropy" selected>' in page and 'data-view="entropy"' in page
    data = _data(page)
    assert not data["hasDiv"] and all(s["d"] is None and s["dt"] is None for s in data["samples"])


def test_without_metrics(tmp_path):
    run = _write_run(tmp_path / "run", metrics=False)
    assert _cli(run) == 0
    assert "no metrics.jsonl" in (run / "inspect" / "inspect-step-20.html").read_text()


def _error(capsys, *argv) -> str:
    assert _cli(*argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("divrl: error: ")
    return captured.err


def test_errors(tmp_path, run_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "inspect_every = 0?" in _error(capsys, empty)
    (empty / "inspect").mkdir()
    assert "inspect_every = 0?" in _error(capsys, empty)
    assert "no such run directory" in _error(capsys, tmp_path / "missing")
    assert "recorded steps: 10, 20" in _error(capsys, run_dir, "--step", 15)

    bad = run_dir / "inspect" / "step-10.json"
    bad.write_text('{"step": 10, "samples": [')
    err = _error(capsys, run_dir, "--step", 10)
    assert str(bad) in err and "malformed JSON" in err
    bad.write_text(json.dumps({"step": 10, "divergence": LABEL, "samples": [dict(STEP_10[0], divergence=[0.1])]}))
    err = _error(capsys, run_dir, "--step", 10)
    assert str(bad) in err and "sample 0" in err and "divergence" in err
    bad.write_text(json.dumps({"step": 11, "divergence": LABEL, "samples": []}))
    assert "holds step 11" in _error(capsys, run_dir, "--step", 10)

    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "rew\n')
    err = _error(capsys, run_dir)
    assert f"{run_dir / 'metrics.jsonl'}:2: not valid JSON" in err
    assert not (run_dir / "inspect" / "inspect-step-20.html").exists()


# --------------------------------------------------------------------------- in a browser -----


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed: no browser test")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("chromium or chromedriver is not installed: no browser test")
    from selenium.common.exceptions import WebDriverException

    try:
        driver = inspect_page.headless_chromium(chromium, chromedriver)
    except WebDriverException as err:
        pytest.skip(f"headless chromium does not start: {err.msg}")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """{"full": page of step 10, "no_ref": the same without a reference}."""
    root = tmp_path_factory.mktemp("inspect")
    full = inspect_page.write_page(_write_run(root / "run"), step=10)
    no_ref = inspect_page.write_page(
        _write_run(root / "no-ref", label=None, step_10=[dict(s, divergence=None) for s in STEP_10]), step=10
    )
    return {"full": full, "no_ref": no_ref}


def _open(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def _select(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def _order(driver) -> list[int]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#samples > .sample')].map(e => +e.dataset.index)"
    )


def _background(driver, sample: int, token: int) -> str:
    return driver.execute_script(
        "return getComputedStyle(document.querySelectorAll(`#sample-${arguments[0]} .tok`)"
        "[arguments[1]]).backgroundColor",
        sample,
        token,
    )


def test_page_renders(browser, pages):
    from selenium.webdriver.common.by import By

    _open(browser, pages["full"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "div.sample")) == 3
    assert len(browser.find_elements(By.CSS_SELECTOR, "span.tok")) == 5 + 6 + 2
    assert browser.execute_script("return window.__pwned === undefined")
    assert browser.find_elements(By.CSS_SELECTOR, "#samples b") == []
    texts = browser.execute_script("return [...document.querySelectorAll('#sample-1 .tok')].map(t => t.textContent)")
    assert texts == ["<b>&", "\n", " ", "x\ny", SCRIPT_TOKEN, ""]
    newline = browser.find_elements(By.CSS_SELECTOR, "#sample-1 .tok")[1]
    assert newline.find_elements(By.CSS_SELECTOR, ".nl")  # the ↵ marker
    from selenium.webdriver.common.action_chains import ActionChains

    token = browser.find_elements(By.CSS_SELECTOR, "#sample-0 .tok")[3]
    ActionChains(browser).move_to_element(token).perform()  # hovering gives the token its title
    title = token.get_attribute("title")
    assert '" 7"' in title and f"{LABEL}: 0.3 nats" in title and "entropy: 2 nats" in title
    summary = browser.find_element(By.CSS_SELECTOR, "#sample-1 .summary").text
    for part in (
        "reward 0",
        "failed",
        "advantage -0.71",
        "divergence total 2.7, mean 0.45",
        "entropy mean 0.35",
        "6 tokens",
    ):
        assert part in summary
    # the line break of "x\ny" puts "y" below "x"; the whitespace-only token is outlined
    assert browser.execute_script("return document.querySelectorAll('#sample-1 .tok')[3].getClientRects().length") == 2
    assert "ws" in browser.find_elements(By.CSS_SELECTOR, "#sample-1 .tok")[2].get_attribute("class")


def test_view_selector_changes_shading(browser, pages):
    _open(browser, pages["full"])
    assert browser.execute_script("return document.getElementById('view').value") == "divergence"
    by_divergence = _background(browser, 0, 3)
    _select(browser, "view", "entropy")
    by_entropy = _background(browser, 0, 3)
    assert by_entropy != by_divergence
    assert _background(browser, 0, 2) != _background(browser, 0, 3)  # 0.1 vs 2.0 nats
    _select(browser, "view", "advantage")
    sample_0 = {_background(browser, 0, j) for j in range(5)}
    assert len(sample_0) == 1 and sample_0 != {_background(browser, 1, 0)}  # +0.71 vs -0.71
    _select(browser, "view", "divergence")
    assert _background(browser, 0, 3) == by_divergence
    assert _background(browser, 1, 4) != by_divergence  # 1.2 nats saturates, 0.3 does not


def test_sort_selector_reorders(browser, pages):
    from selenium.webdriver.common.by import By

    _open(browser, pages["full"])
    assert _order(browser) == [0, 2, 1]  # reward, highest first
    _select(browser, "sort", "divergence")
    assert _order(browser) == [1, 0, 2]
    browser.find_element(By.ID, "ascending").click()
    assert _order(browser) == [2, 0, 1]
    _select(browser, "sort", "reward")
    assert _order(browser) == [1, 2, 0]


def test_page_without_reference(browser, pages):
    _open(browser, pages["no_ref"])
    assert browser.execute_script("return document.getElementById('view').value") == "entropy"
    assert browser.execute_script("return document.body.dataset.view") == "entropy"
    assert _background(browser, 0, 3) != _background(browser, 0, 2)
    assert _order(browser) == [0, 2, 1]


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_screenshot(browser, pages, tmp_path):
    png = inspect_page.screenshot(
        pages["full"], tmp_path / "shared.png", width=1000, driver=browser, view="entropy", sort="divergence"
    )
    width, height = _png_size(png)
    assert width == 1000 and 300 < height <= 2400
    assert _order(browser) == [1, 0, 2]
    # on its own driver, as the README's screenshot is made
    png = inspect_page.screenshot(pages["full"], tmp_path / "own" / "page.png", max_height=500)
    assert _png_size(png) == (1280, 500)


def test_a_training_run_records_what_the_page_shows(tmp_path, capsys):
    """The trainer's records (inspect_every) of a tiny run: per token text, entropy and exact KL,
    the sample's reward and advantage; `divrl inspect RUN` renders the latest."""
    from divrl.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--set",
                "model=tiny",
                "--set",
                "steps=2",
                "--set",
                "prompts_per_step=2",
                "--set",
                "group_size=2",
                "--set",
                "max_new_tokens=4",
                "--set",
                "eval_size=2",
                "--set",
                "eval_samples=2",
                "--set",
                "train_size=20",
                "--set",
                "inspect_every=2",
                "--set",
                f"output_dir={run}",
            ]
        )
        == 0
    )
    assert inspect_page.recorded_steps(run).keys() == {2}
    record = json.loads((run / "inspect" / "step-2.json").read_text())
    assert record["divergence"] == "KL(πθ ‖ π_ref)" and len(record["samples"]) == 4
    for sample in record["samples"]:
        assert len(sample["tokens"]) == len(sample["entropy"]) == len(sample["divergence"]) >= 1
        assert all(e > 5 for e in sample["entropy"])  # a random tiny model is nearly uniform
        assert all(abs(d) < 1e-5 for d in sample["divergence"])  # the policy is still the reference
    capsys.readouterr()
    assert main(["inspect", str(run)]) == 0
    assert (run / "inspect" / "inspect-step-2.html").is_file()
