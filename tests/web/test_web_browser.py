"""``diffpo label`` and ``diffpo view`` in a real headless browser (Playwright driving the system
Chromium): label with the keyboard, kill the server, restart, check the manifest; open an
evaluation and check the page shows what its files hold; paths outside the folders are refused.

The servers are the real CLI in subprocesses. The screenshots in the README (docs/img/) are
taken here: every run takes them (into a temporary folder), and ``DIFFPO_UPDATE_SCREENSHOTS=1``
writes them to docs/img/ instead, so a plain test run leaves the working tree clean.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from web_helpers import REPO, browser, chromium_path, serve, write_candidate_folder, write_eval_folder  # noqa: F401 - fixtures

from diffpo.config import DataConfig
from diffpo.data import load_pair_records



@pytest.fixture
def screenshots(tmp_path_factory) -> Path:
    if os.environ.get("DIFFPO_UPDATE_SCREENSHOTS") == "1":
        return REPO / "docs" / "img"
    return tmp_path_factory.mktemp("screenshots")


def status_of(url: str, raw_path: str) -> int:
    """GET ``raw_path`` exactly as written (no client-side ``..`` normalisation)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", raw_path)
        return connection.getresponse().status
    finally:
        connection.close()


def manifest_by_task(path: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["task"], []).append(row)
    return rows


def press(page, key: str, progress: str | None = None, prompt_id: str | None = None) -> None:
    """Press ``key`` and wait until the page shows the server's answer."""
    page.keyboard.press(key)
    if progress is not None:
        page.wait_for_function("text => document.getElementById('progress').textContent === text", arg=progress, timeout=5000)
    if prompt_id is not None:
        page.wait_for_function("text => document.getElementById('task-id').textContent === text", arg=f"prompt {prompt_id}", timeout=5000)


def test_label_with_keys_survives_a_kill_and_resumes(tmp_path, serve, browser, screenshots):
    source = write_candidate_folder(tmp_path / "cands", 6)
    out = tmp_path / "pairs" / "hand"
    server = serve("label", "--images", str(source), "--out", str(out))
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    page.goto(server.url)
    page.wait_for_function("document.getElementById('task-id').textContent === 'prompt p00'")
    assert page.inner_text("#prompt") == "a red circle on a gray background"
    assert page.locator("#candidates img").count() == 2
    press(page, "ArrowLeft", "1 of 6 labelled", "p01")   # p00: left
    press(page, "ArrowRight", "2 of 6 labelled", "p02")  # p01: right
    press(page, "t", "3 of 6 labelled", "p03")           # p02: tie
    press(page, "s", "3 of 6 labelled", "p04")           # p03: skipped, comes back later
    press(page, "1", "4 of 6 labelled", "p05")           # p04: left ...
    press(page, "u", "3 of 6 labelled", "p04")           # ... undone
    press(page, "2", "4 of 6 labelled", "p05")           # p04: right
    assert "per hour" in page.inner_text("#rate")

    # The files as the server left them; no page or server code runs after the kill.
    server.kill()
    expected = {"p00": ("c0", "c1", False), "p01": ("c1", "c0", False), "p02": ("c0", "c1", True), "p04": ("c1", "c0", False)}
    assert {task: (Path(r[0]["chosen"]).stem, Path(r[0]["rejected"]).stem, r[0].get("tie", False)) for task, r in manifest_by_task(out / "pairs.jsonl").items()} == expected

    # A restart resumes: 4 of 6 answered, the skipped prompt is the first one left.
    server = serve("label", "--images", str(source), "--out", str(out))
    assert "4 already answered" in "".join(server.lines)
    page.goto(server.url)
    page.wait_for_function("document.getElementById('task-id').textContent === 'prompt p03'")
    assert page.inner_text("#progress") == "4 of 6 labelled"
    page.locator("#candidates img").nth(1).evaluate("img => img.complete || new Promise(r => img.onload = r)")
    screenshots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshots / "label.png"))
    # Only the candidates' folder is served, and only images in it.
    assert status_of(server.url, "/images/p03/c0.png") == 200
    for outside in ("/images/../pairs/hand/pairs.jsonl", "/images/..%2F..%2F..%2Fetc%2Fpasswd", "/images//etc/passwd"):
        assert status_of(server.url, outside) == 403, outside
    assert status_of(server.url, "/images/p03/prompt.txt") == 404
    press(page, "ArrowLeft", "5 of 6 labelled", "p05")   # p03: left
    press(page, "ArrowRight", "6 of 6 labelled")         # p05: right
    page.wait_for_selector("#done", state="visible")
    page.close()

    # Ctrl-C stops the server cleanly.
    code, output = server.interrupt()
    assert code == 0 and "stopped" in output and "Traceback" not in output, output
    expected |= {"p03": ("c0", "c1", False), "p05": ("c1", "c0", False)}
    answers = manifest_by_task(out / "pairs.jsonl")
    assert {task: (Path(r[0]["chosen"]).stem, Path(r[0]["rejected"]).stem, r[0].get("tie", False)) for task, r in answers.items()} == expected
    pairs, report = load_pair_records(DataConfig(source=str(out)))
    assert len(pairs) == 5 and report.ties_dropped == 1
    assert {(p.prompt, Path(p.chosen).parent.name, Path(p.chosen).stem) for p in pairs} == {
        (r[0]["prompt"], task, expected[task][0]) for task, r in answers.items() if task != "p02"}


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    prompts = ["a red circle on a gray background", "a blue square on a gray background", "a green circle on a gray background", "a yellow square on a gray background"]
    return write_eval_folder(tmp_path_factory.mktemp("eval"), prompts, images_per_prompt=3)


def g4(x: float) -> str:
    return format(float(format(x, ".4g")), "g")


def test_view_shows_the_evaluation_files(evaluation, serve, browser, screenshots):
    results = json.loads((evaluation / "results.json").read_text())
    scores = [json.loads(line) for line in (evaluation / "scores.jsonl").read_text().splitlines()]
    index = {(r["prompt_index"], r["seed"]): r for r in map(json.loads, (evaluation / "images" / "index.jsonl").read_text().splitlines())}
    server = serve("view", str(evaluation))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url)
    page.wait_for_selector(".item")

    # The summary table: one row per scorer with results.json's numbers, formatted like report.md.
    for name, s in results["scorers"].items():
        row = page.locator(f"#summary tr[data-scorer='{name}']")
        low, high = s["win_rate_ci"]
        assert row.locator(".win").inner_text() == f"{s['win_rate']:.3f} [{low:.3f}, {high:.3f}]"
        assert row.locator(".base").inner_text().startswith(g4(s["mean_base"]) + " ± ")
        assert row.locator(".tuned").inner_text().startswith(g4(s["mean_tuned"]) + " ± ")
        assert row.locator(".n").inner_text() == str(s["n"])

    # Every (prompt, seed): its scores under each image, and the right image files, loaded.
    shown = page.evaluate("""() => [...document.querySelectorAll('.item')].map(item => ({
        prompt_index: Number(item.dataset.promptIndex), seed: Number(item.dataset.seed),
        prompt: item.querySelector('.prompt').textContent,
        base: Object.fromEntries([...item.querySelectorAll('.base tr')].map(tr => [tr.dataset.scorer, Number(tr.dataset.value)])),
        tuned: Object.fromEntries([...item.querySelectorAll('.tuned tr')].map(tr => [tr.dataset.scorer, Number(tr.dataset.value)])),
        images: [...item.querySelectorAll('img')].map(img => [decodeURIComponent(new URL(img.src).pathname), img.naturalWidth]),
    }))""")
    assert [{k: v for k, v in item.items() if k != "images"} for item in shown] == [
        {k: row[k] for k in ("prompt_index", "seed", "prompt", "base", "tuned")} for row in scores]
    for item in shown:
        files = index[(item["prompt_index"], item["seed"])]
        assert [path for path, _ in item["images"]] == [f"/images/{files['base']}", f"/images/{files['tuned']}"]
    page.wait_for_function("[...document.images].every(img => img.complete && img.naturalWidth > 0)")

    # Sort by score difference and filter by prompt and by sign.
    def diffs() -> list[float]:
        return page.evaluate("() => [...document.querySelectorAll('.item .diff')].map(d => Number(d.dataset.value))")

    page.select_option("#scorer", "redness")
    page.select_option("#sort", "diff-desc")
    expected = sorted((r["tuned"]["redness"] - r["base"]["redness"] for r in scores), reverse=True)
    assert diffs() == pytest.approx(expected, abs=0)
    page.select_option("#show", "tuned")
    assert diffs() == [d for d in expected if d > 0]
    page.select_option("#show", "all")
    page.fill("#filter", "circle")
    assert page.inner_text("#count") == f"showing {sum('circle' in r['prompt'] for r in scores)} of {len(scores)}"
    page.fill("#filter", "")
    page.select_option("#scorer", "brightness")
    page.screenshot(path=str(screenshots / "view.png"))
    page.close()

    # Only the evaluation's images folder is served.
    assert status_of(server.url, "/images/base/0000_00.png") == 200
    os.symlink(evaluation / "grid.png", evaluation / "images" / "base" / "escape.png")
    for outside in ("/images/../grid.png", "/images/..%2Fresults.json", "/images/base/escape.png", "/images//etc/passwd"):
        assert status_of(server.url, outside) == 403, outside
    assert status_of(server.url, "/images/index.jsonl") == 404
