"""`divrl inspect RUN [--step N] [--out DIR]`: where did the divergence go?

Writes one self-contained HTML page (no server, no network: styles, script, data and plots inline)
of the completions sampled at one recorded training step of a run: every token shaded by its
divergence to the reference/teacher, its entropy, or the sample's advantage (#view selects), each
sample with its prompt, reward, verdict and a summary line, sortable by reward or total divergence
(#sort), and the run's reward / KL / entropy curves as inline SVG with the step marked.

Reads RUN/inspect/step-N.json (written by the trainer every `inspect_every` steps) and
RUN/metrics.jsonl; writes DIR/inspect-step-N.html (DIR defaults to RUN/inspect) and prints its path.
`screenshot(html, png)` renders such a page to a PNG with headless Chromium (needs selenium).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import shutil
import sys
from pathlib import Path

from divrl.runlog import read_metrics

_STEP_FILE = re.compile(r"step-(\d+)\.json")
# End colours of the ramps (white → colour); mid-tones so that black text stays readable on them.
COLOURS = {
    "divergence": (247, 103, 7),
    "entropy": (151, 117, 250),
    "positive": (51, 154, 240),
    "negative": (255, 107, 107),
}
_PERCENTILE = 0.99  # divergence/entropy saturate at this percentile of the page's positive values
_MIN_FOR_PERCENTILE = 100  # fewer values than this: saturate at the maximum
_MAX_CURVE_POINTS = 1500


class InspectError(ValueError):
    """Bad input of `divrl inspect`: the message names the run, step or file."""


# ----------------------------------------------------------------------------------- reading ----


def recorded_steps(run_dir: Path) -> dict[int, Path]:
    """{step: path} of RUN/inspect/step-N.json, by step."""
    inspect_dir = Path(run_dir) / "inspect"
    found: dict[int, Path] = {}
    if inspect_dir.is_dir():
        for path in inspect_dir.iterdir():
            match = _STEP_FILE.fullmatch(path.name)
            if match and path.is_file():
                found.setdefault(int(match.group(1)), path)
    return dict(sorted(found.items()))


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value, what: str) -> float | None:
    if value is None:
        return None
    if not _is_number(value):
        raise ValueError(f"{what} must be a number or null, got {value!r:.40}")
    return float(value)


def _per_token(values, what: str, count: int) -> list[float] | None:
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != count:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise ValueError(f"'{what}' must be a list of one value per token ({count}), got {got}")
    if not all(v is None or _is_number(v) for v in values):
        raise ValueError(f"'{what}' must hold numbers (or null)")
    return [math.nan if v is None else float(v) for v in values]


def _finite(values) -> list[float]:
    return [v for v in values or () if math.isfinite(v)]


def _sample(raw, has_divergence: bool) -> dict:
    if not isinstance(raw, dict):
        raise ValueError("must be an object")
    tokens = raw.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError("'tokens' must be a list of strings")
    prompt, completion = raw.get("prompt", ""), raw.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str | None):
        raise ValueError("'prompt' and 'completion' must be strings")
    passed = raw.get("passed")
    if not isinstance(passed, bool | None):
        raise ValueError(f"'passed' must be true, false or null, got {passed!r:.40}")
    divergence = _per_token(raw.get("divergence"), "divergence", len(tokens)) if has_divergence else None
    entropy = _per_token(raw.get("entropy"), "entropy", len(tokens))
    div, ent = _finite(divergence), _finite(entropy)
    return {
        "prompt": prompt,
        "completion": "".join(tokens) if completion is None else completion,
        "tokens": tokens,
        "divergence": divergence,
        "entropy": entropy,
        "reward": _number(raw.get("reward"), "'reward'"),
        "passed": passed,
        "advantage": _number(raw.get("advantage"), "'advantage'"),
        "divergence_total": sum(div) if div else None,
        "divergence_mean": sum(div) / len(div) if div else None,
        "entropy_mean": sum(ent) / len(ent) if ent else None,
    }


def load_step(path: Path, step: int | None = None) -> dict:
    """The record of RUN/inspect/step-N.json, checked: {"step", "divergence" (label or None),
    "samples": [{prompt, completion, tokens, divergence, entropy (float lists, NaN for null, or
    None), reward, passed, advantage, divergence_total, divergence_mean, entropy_mean}]}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InspectError(f"{path}: malformed JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InspectError(f"cannot read {path}: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("samples"), list):
        raise InspectError(f"{path}: malformed record: expected an object with a 'samples' list")
    label = raw.get("divergence")
    if not isinstance(label, str | None):
        raise InspectError(f"{path}: malformed record: 'divergence' must be a label or null")
    recorded = raw.get("step", step)
    if step is not None and recorded != step:
        raise InspectError(f"{path}: malformed record: holds step {recorded!r}, expected {step}")
    samples = []
    for i, sample in enumerate(raw["samples"]):
        try:
            samples.append(_sample(sample, label is not None))
        except ValueError as err:
            raise InspectError(f"{path}: malformed record: sample {i}: {err}") from None
    return {"step": recorded, "divergence": label, "samples": samples}


def _metrics(run_dir: Path) -> list[dict] | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    try:
        rows = read_metrics(path, InspectError)
    except (OSError, UnicodeDecodeError) as err:
        raise InspectError(f"cannot read {path}: {err}") from None
    return [row for row in rows if isinstance(row, dict) and _is_number(row.get("step"))]


# ----------------------------------------------------------------------------------- curves -----


def _nice_ticks(lo: float, hi: float, count: int, integer: bool = False):
    """(axis low, axis high, ticks): round-numbered ticks covering [lo, hi]."""
    if not hi > lo:
        pad = 1.0 if integer else (abs(lo) * 0.1 or 0.5)
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(math.ceil(step - 1e-9)))
    first = math.floor(lo / step + 1e-9) * step
    last = math.ceil(hi / step - 1e-9) * step
    return first, last, [first + i * step for i in range(round((last - first) / step) + 1)]


def _tick_label(value: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = next((d for d in range(10) if abs(round(step, d) - step) < 1e-9 * abs(step)), 10)
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _panel(title: str, series: list, step: int) -> str:
    """One inline SVG plot of `series` [(name, colour, [(step, value)], value at `step` or None)]
    with `step` marked."""
    # title, then one legend line per series (at most two), above the frame
    width, height, left, right, top, bottom = 380, 206, 50, 12, 46, 30
    xs = [x for _, _, points, _ in series for x, _ in points] + [step]
    ys = [y for _, _, points, _ in series for _, y in points]
    x0, x1, xticks = _nice_ticks(min(xs), max(xs), 5, integer=True)
    y0, y1, yticks = _nice_ticks(min(ys), max(ys), 4)

    def px(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    out = [
        f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(title)} against step">',
        f'<text x="{left}" y="15" class="ct">{html.escape(title)}</text>',
    ]
    for y in yticks:
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" class="grid"/>'
            f'<text x="{left - 4}" y="{py(y) + 4:.1f}" text-anchor="end">'
            f"{_tick_label(y, yticks)}</text>"
        )
    for x in xticks:
        out.append(
            f'<text x="{px(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{_tick_label(x, xticks)}</text>'
        )
    out.append(f'<text x="{width - right}" y="{height - 3}" text-anchor="end">step</text>')
    out.append(
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" class="frame"/>'
    )
    out.append(
        f'<line x1="{px(step):.1f}" x2="{px(step):.1f}" y1="{top}" y2="{height - bottom}" '
        f'class="here"><title>inspected step {step}</title></line>'
    )
    for k, (name, colour, points, at) in enumerate(series):
        if len(points) == 1:
            ((x, y),) = points
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        else:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        label = name if at is None else f"{name} = {_fmt(at)} at step {step}"
        out.append(f'<text x="{left}" y="{29 + 13 * k}" fill="{colour}" class="cl">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


_CURVES = [
    ("reward", [("reward", "#1971c2"), ("eval_pass@1", "#2f9e44")]),
    ("KL", [("kl", "#e8590c")]),
    ("entropy", [("entropy", "#7048e8")]),
]


def curves_html(metrics: list[dict] | None, step: int) -> str:
    """Inline SVG plots of reward (and eval_pass@1), KL and entropy against step, or a note."""
    if metrics is None:
        return '<p class="note">no metrics.jsonl in the run: no curves.</p>'
    panels = []
    for title, keys in _CURVES:
        series = []
        for key, colour in keys:
            points = [
                (float(row["step"]), float(row[key]))
                for row in metrics
                if _is_number(row.get(key)) and math.isfinite(row[key])
            ]
            points.sort()
            at = next((y for x, y in points if x == step), None)
            if len(points) > _MAX_CURVE_POINTS:
                stride = math.ceil(len(points) / _MAX_CURVE_POINTS)
                points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
            if points:
                series.append((key, colour, points, at))
        if series:
            panels.append(_panel(title, series, step))
    if not panels:
        return '<p class="note">metrics.jsonl has no reward, kl or entropy values: no curves.</p>'
    return "".join(panels)


# ------------------------------------------------------------------------------------- page -----


def _scale(values: list[float]) -> tuple[float, float | None]:
    """(saturation value, max) of the positive finite values: the max, or a high percentile."""
    positive = sorted(v for v in values if math.isfinite(v) and v > 0)
    if not positive:
        return 1.0, None
    if len(positive) < _MIN_FOR_PERCENTILE:
        return positive[-1], positive[-1]
    return positive[int(_PERCENTILE * (len(positive) - 1))] or positive[-1], positive[-1]


def _rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({},{},{})".format(*colour)


def _compact(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(f"{value:.4g}")


def _legend(view: str, text: str) -> str:
    return f'<span class="legend" id="legend-{view}">{text}</span>'


def _ramp_legend(view: str, label: str, scale: float, vmax: float | None, negative: bool) -> str:
    bar = f'<span class="bar" style="background:linear-gradient(to right,#fff,{_rgb(COLOURS[view])})"></span>'
    if vmax is None:
        saturate = "no positive values"
    elif vmax > scale:
        saturate = (
            f"full colour at ≥ {_fmt(scale, 3)} nats ({round(_PERCENTILE * 100)}th percentile"
            f" of the page; max {_fmt(vmax, 3)})"
        )
    else:
        saturate = f"full colour at the page's max {_fmt(scale, 3)} nats"
    note = "; values ≤ 0 white" if negative else ""
    return _legend(view, f"{html.escape(label)}: 0 {bar} {saturate}{note}; grey: n/a")


def render_page(run_dir: Path, record: dict, metrics: list[dict] | None, steps: list[int] | None = None) -> str:
    """The HTML page of `record` (load_step's) of the run in `run_dir`."""
    step, label, samples = record["step"], record["divergence"], record["samples"]
    has_div = label is not None
    div_values = [v for s in samples for v in s["divergence"] or ()]
    ent_values = [v for s in samples for v in s["entropy"] or ()]
    div_scale, div_max = _scale(div_values)
    ent_scale, ent_max = _scale(ent_values)
    advantages = [abs(s["advantage"]) for s in samples if s["advantage"] is not None and math.isfinite(s["advantage"])]
    adv_scale = max(advantages, default=0.0) or 1.0
    data = {
        "step": step,
        "label": label,
        "hasDiv": has_div,
        "scales": {"divergence": div_scale, "entropy": ent_scale, "advantage": adv_scale},
        "colours": {name: list(colour) for name, colour in COLOURS.items()},
        "samples": [
            {
                "p": s["prompt"],
                "t": s["tokens"],
                "c": s["completion"] if not s["tokens"] else None,
                "d": [_compact(v) for v in s["divergence"]] if s["divergence"] is not None else None,
                "e": [_compact(v) for v in s["entropy"]] if s["entropy"] is not None else None,
                "r": _compact(s["reward"]),
                "ok": s["passed"],
                "a": _compact(s["advantage"]),
                "dt": _compact(s["divergence_total"]),
                "dm": _compact(s["divergence_mean"]),
                "em": _compact(s["entropy_mean"]),
                "n": len(s["tokens"]),
            }
            for s in samples
        ],
    }
    # Inside <script type="application/json"> only "</script" and "<!--" could end or derail it:
    # escaping <, > and & (legal only inside JSON strings) rules both out.
    payload = (
        json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )

    rewards = [s["reward"] for s in samples if s["reward"] is not None]
    verdicts = [s["passed"] for s in samples if s["passed"] is not None]
    facts = [f"{len(samples)} samples"]
    if verdicts:
        facts.append(f"passed {sum(verdicts)}/{len(verdicts)}")
    if rewards:
        facts.append(f"mean reward {_fmt(sum(rewards) / len(rewards), 3)}")
    totals = [s["divergence_total"] for s in samples if s["divergence_total"] is not None]
    if totals:
        facts.append(f"mean total divergence {_fmt(sum(totals) / len(totals), 3)} nats")
    run_name = Path(run_dir).resolve().name
    if has_div:
        divergence_line = f'divergence: <b id="label">{html.escape(label)}</b> (per token, nats)'
    else:
        divergence_line = (
            '<span class="note" id="no-divergence">this run has no reference or teacher: '
            "no per-token divergence was recorded, so the divergence view and sort are "
            "unavailable.</span>"
        )
    shown_steps = ""
    if steps:
        listed = ", ".join(map(str, steps[:60])) + (", …" if len(steps) > 60 else "")
        shown_steps = f'<p class="meta">recorded steps: {listed}</p>'
    disabled = "" if has_div else " disabled"
    view_options = (
        f'<option value="divergence"{disabled}{" selected" if has_div else ""}>'
        "divergence</option>"
        f'<option value="entropy"{"" if has_div else " selected"}>entropy</option>'
        '<option value="advantage">advantage</option>'
    )
    sort_options = (
        '<option value="reward" selected>reward</option>'
        f'<option value="divergence"{disabled}>total divergence</option>'
        '<option value="entropy">mean entropy</option>'
        '<option value="advantage">advantage</option>'
        '<option value="length">length</option>'
        '<option value="recorded">recorded order</option>'
    )
    legends = ""
    if has_div:
        legends += _ramp_legend(
            "divergence", label, div_scale, div_max, any(math.isfinite(v) and v < 0 for v in div_values)
        )
    legends += _ramp_legend("entropy", "entropy", ent_scale, ent_max, False)
    adv_bar = (
        f'<span class="bar" style="background:linear-gradient(to right,{_rgb(COLOURS["negative"])},'
        f'#fff,{_rgb(COLOURS["positive"])})"></span>'
    )
    legends += _legend(
        "advantage", f"advantage (per sample): −{_fmt(adv_scale, 3)} {adv_bar} +{_fmt(adv_scale, 3)}; grey: n/a"
    )
    title = html.escape(f"divrl inspect: {run_name}, step {step}")
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width,initial-scale=1">',
            f"<title>{title}</title><style>{_CSS}</style></head>\n",
            f'<body data-view="{"divergence" if has_div else "entropy"}">',
            f'<header><h1>divrl inspect: <span id="run">{html.escape(run_name)}</span>, '
            f'step <span id="step">{step}</span></h1>',
            f'<p class="meta">{divergence_line}</p>',
            f'<p class="meta">{"; ".join(facts)}</p>{shown_steps}</header>\n',
            f'<section id="curves">{curves_html(metrics, step)}</section>\n',
            '<div id="controls"><label>shade tokens by <select id="view">',
            view_options,
            "</select></label>",
            '<label>sort by <select id="sort">',
            sort_options,
            "</select></label>",
            '<label><input type="checkbox" id="ascending"> ascending</label>',
            legends,
            "</div>\n",
            '<noscript><p class="note">this page builds the samples with JavaScript.</p></noscript>',
            '<main id="samples"></main>\n',
            f'<script type="application/json" id="data">{payload}</script>\n',
            f"<script>{_JS}</script>\n</body></html>\n",
        ]
    )


def write_page(run_dir: Path, step: int | None = None, out_dir: Path | None = None) -> Path:
    """Write the page of `step` (default: the latest recorded) of the run; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InspectError(f"{run_dir}: no such run directory")
    steps = recorded_steps(run_dir)
    if not steps:
        raise InspectError(
            f"{run_dir} has no inspect records ({run_dir / 'inspect'}/step-N.json); "
            "was the run trained with inspect_every = 0?"
        )
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise InspectError(f"step {step} was not recorded in {run_dir}; recorded steps: " + ", ".join(map(str, steps)))
    record = load_step(steps[step], step)
    page = render_page(run_dir, record, _metrics(run_dir), list(steps))
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "inspect"
    path = out_dir / f"inspect-step-{step}.html"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8", errors="replace")  # lone surrogates → "?"
    except OSError as err:
        raise InspectError(f"cannot write {path}: {err}") from None
    return path


# -------------------------------------------------------------------------------------- CLI -----


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `inspect` subcommand on an argparse subparsers object; its handler is `run`."""
    parser = subparsers.add_parser(
        "inspect",
        help="HTML page of one step's samples, every token shaded by divergence, entropy or advantage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="run directory (holds metrics.jsonl and inspect/)")
    parser.add_argument("--step", type=int, metavar="N", help="the recorded step to show (default: the latest)")
    parser.add_argument("--out", metavar="DIR", help="directory of inspect-step-N.html (default: RUN/inspect)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of `divrl inspect`: write the page, print its path; 2 on bad input."""
    try:
        path = write_page(Path(args.run), args.step, Path(args.out) if args.out else None)
    except InspectError as err:
        print(f"divrl: error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


# ------------------------------------------------------------------------------- screenshot -----


def headless_chromium(binary: str | None = None, driver_path: str | None = None):
    """A selenium driver of headless Chromium (browser console logged). Without `binary` or
    `driver_path`, the first chromium/chrome and chromedriver on PATH; failing those, selenium's
    own discovery. RuntimeError without selenium."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        raise RuntimeError(
            "screenshots of the inspect page need selenium (pip install selenium) and Chromium with chromedriver"
        ) from err
    binary = binary or next(
        filter(
            None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"))
        ),
        None,
    )
    driver_path = driver_path or shutil.which("chromedriver")
    options = webdriver.ChromeOptions()
    if binary:
        options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path) if driver_path else Service()
    return webdriver.Chrome(options=options, service=service)


def screenshot(
    html_path,
    png_path,
    *,
    width: int = 1280,
    max_height: int = 2400,
    view: str | None = None,
    sort: str | None = None,
    driver=None,
) -> Path:
    """Render the page at `html_path` to `png_path`: `width` CSS pixels wide, as tall as the page
    up to `max_height`; `view`/`sort` set the selectors first. Starts (and quits) a headless
    Chromium unless a selenium `driver` of Chromium is given."""
    own = driver is None
    if own:
        driver = headless_chromium()
    try:
        metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        driver.get(Path(html_path).resolve().as_uri())
        for element, value in (("view", view), ("sort", sort)):
            if value is not None:
                driver.execute_script(
                    "const s = document.getElementById(arguments[0]); s.value = arguments[1];"
                    "s.dispatchEvent(new Event('change'));",
                    element,
                    value,
                )
        height = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
        metrics["height"] = max(1, min(int(height), max_height))
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        png = driver.get_screenshot_as_png()
    finally:
        if own:
            driver.quit()
        else:
            driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.write_bytes(png)
    return png_path


# ---------------------------------------------------------------------------------- assets -----

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#212529;
background:#fff;max-width:1240px;margin:0 auto;padding:10px 20px}
h1{font-size:20px;margin:6px 0}
.meta{margin:2px 0;color:#495057}
.note{background:#fff3bf;padding:2px 8px;border-radius:4px}
#curves{display:flex;flex-wrap:wrap;gap:6px;margin:8px 0}
svg.curve{font-size:11px;fill:#495057}
svg .ct{font-size:13px;font-weight:600;fill:#212529}
svg .cl{font-size:11px}
svg .grid{stroke:#e9ecef}
svg .frame{fill:none;stroke:#adb5bd}
svg .here{stroke:#212529;stroke-dasharray:4 3}
#controls{position:sticky;top:0;z-index:1;background:#fff;display:flex;flex-wrap:wrap;gap:8px 18px;
align-items:center;padding:6px 0;border-bottom:1px solid #dee2e6}
.legend{display:none;align-items:center;gap:6px;font-size:12px;color:#495057}
body[data-view=divergence] #legend-divergence,body[data-view=entropy] #legend-entropy,
body[data-view=advantage] #legend-advantage{display:inline-flex}
.bar{display:inline-block;width:140px;height:12px;border:1px solid #adb5bd}
.sample{border:1px solid #dee2e6;border-left:5px solid #ced4da;border-radius:5px;margin:10px 0;
padding:6px 10px}
.sample.pass{border-left-color:#2f9e44}
.sample.fail{border-left-color:#e03131}
.summary{font-size:13px}
.summary .verdict{font-weight:600}
.pass .verdict{color:#2b8a3e}
.fail .verdict{color:#c92a2a}
.prompt>summary{cursor:pointer;color:#495057;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.prompt pre{white-space:pre-wrap;word-break:break-word;background:#f8f9fa;margin:4px 0;padding:6px;
max-height:18em;overflow:auto}
.completion{font:13px/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
word-break:break-word;tab-size:4;margin-top:4px}
.tok{border-radius:2px}
.tok:hover{outline:1px solid #212529}
.tok.ws{outline:1px dotted #868e96;outline-offset:-1px}
.nl::before{content:"\\21B5";color:#adb5bd}
.tok.empty::before{content:"\\2205";color:#adb5bd}
body[data-view=advantage] .tok{background:var(--a,transparent)}
"""

_JS = r"""
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const S = D.scales, C = D.colours, NA = "rgb(222,226,230)";
  const box = document.getElementById("samples");
  const view = document.getElementById("view"), sort = document.getElementById("sort");
  const ascending = document.getElementById("ascending");

  function mix(end, t) {
    t = Math.max(0, Math.min(1, t));
    return "rgb(" + end.map(function (c) { return Math.round(255 + (c - 255) * t); }).join(",") + ")";
  }
  // Per-token shading: a class per quantized level ("d0".."d32", "dn" for n/a), whose colour the
  // rules below give only under the selected view: switching views restyles by one attribute.
  const LEVELS = 32, rules = [];
  [["divergence", "d"], ["entropy", "e"]].forEach(function (v) {
    const sel = "body[data-view=" + v[0] + "] .tok.";
    for (let k = 0; k <= LEVELS; k++) {
      rules.push(sel + v[1] + k + "{background:" + mix(C[v[0]], k / LEVELS) + "}");
    }
    rules.push(sel + v[1] + "n{background:" + NA + "}");
  });
  const style = document.createElement("style");
  style.textContent = rules.join("\n");
  document.head.appendChild(style);
  function level(prefix, v, scale) {
    return prefix + (v === null ? "n" : Math.round(Math.max(0, Math.min(1, v / scale)) * LEVELS));
  }
  function diverging(v) {
    if (v === null) return NA;
    return v >= 0 ? mix(C.positive, v / S.advantage) : mix(C.negative, -v / S.advantage);
  }
  function fmt(v) { return v === null || v === undefined ? "n/a" : String(+v.toPrecision(3)); }
  function signed(v) { return v === null ? "n/a" : (v > 0 ? "+" : "") + fmt(v); }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fill(tok, piece) {
    if (piece === "") { tok.classList.add("empty"); return; }
    if (/^\s+$/.test(piece)) tok.classList.add("ws");
    piece.split("\n").forEach(function (part, k) {
      if (k > 0) { tok.appendChild(el("span", "nl")); tok.appendChild(document.createTextNode("\n")); }
      if (part) tok.appendChild(document.createTextNode(part));
    });
  }
  function build(s, i) {
    const div = el("div", "sample" + (s.ok === true ? " pass" : s.ok === false ? " fail" : ""));
    div.id = "sample-" + i;
    div.dataset.index = i;
    div.style.setProperty("--a", diverging(s.a));
    const parts = ["#" + i, "reward " + fmt(s.r)];
    const summary = el("div", "summary");
    const verdict = s.ok === true ? "\u2713 passed" : s.ok === false ? "\u2717 failed" : "no verdict";
    summary.appendChild(el("span", "verdict", verdict));
    parts.push("advantage " + signed(s.a));
    if (D.hasDiv) parts.push("divergence total " + fmt(s.dt) + ", mean " + fmt(s.dm) + " nats");
    parts.push("entropy mean " + fmt(s.em) + " nats", s.n + " tokens");
    summary.appendChild(document.createTextNode(" \u00b7 " + parts.join(" \u00b7 ")));
    div.appendChild(summary);
    const prompt = el("details", "prompt");
    const firstLine = s.p.split("\n").find(function (line) { return line.trim(); }) || "(empty prompt)";
    prompt.appendChild(el("summary", null, "prompt: " + firstLine));
    prompt.appendChild(el("pre", null, s.p));
    div.appendChild(prompt);
    const comp = el("div", "completion");
    s.t.forEach(function (piece, j) {
      const tok = el("span", "tok " + (D.hasDiv ? level("d", s.d ? s.d[j] : null, S.divergence) + " " : "") +
        level("e", s.e ? s.e[j] : null, S.entropy));
      fill(tok, piece);
      comp.appendChild(tok);
    });
    if (!s.t.length && s.c) comp.appendChild(document.createTextNode(s.c));
    div.appendChild(comp);
    return div;
  }
  function describe(tok) {  // the hover text of a token, made when first hovered
    const div = tok.closest(".sample"), s = D.samples[+div.dataset.index];
    const j = Array.prototype.indexOf.call(tok.parentNode.children, tok);
    const d = s.d ? s.d[j] : null, e = s.e ? s.e[j] : null;
    return "token " + j + ": " + JSON.stringify(s.t[j]) +
      (D.hasDiv ? "\n" + D.label + ": " + fmt(d) + " nats" : "") +
      "\nentropy: " + fmt(e) + " nats\nadvantage: " + signed(s.a);
  }
  box.addEventListener("mouseover", function (event) {
    const tok = event.target.closest && event.target.closest(".tok");
    if (tok && !tok.title) tok.title = describe(tok);
  });
  const nodes = D.samples.map(build);
  const keys = {
    reward: function (s) { return s.r; }, divergence: function (s) { return s.dt; },
    entropy: function (s) { return s.em; }, advantage: function (s) { return s.a; },
    length: function (s) { return s.n; }, recorded: null
  };
  function order() {
    const key = keys[sort.value], up = ascending.checked;
    const idx = D.samples.map(function (_, i) { return i; });
    if (key) idx.sort(function (a, b) {
      const x = key(D.samples[a]), y = key(D.samples[b]);
      if (x === null || y === null) return x === y ? a - b : (x === null ? 1 : -1);
      return (up ? x - y : y - x) || a - b;
    });
    idx.forEach(function (i) { box.appendChild(nodes[i]); });
  }
  function shade() { document.body.dataset.view = view.value; }
  view.addEventListener("change", shade);
  sort.addEventListener("change", order);
  ascending.addEventListener("change", order);
  if (view.selectedOptions[0] && view.selectedOptions[0].disabled) view.value = "entropy";
  if (sort.selectedOptions[0] && sort.selectedOptions[0].disabled) sort.value = "reward";
  shade();
  order();
})();
"""
