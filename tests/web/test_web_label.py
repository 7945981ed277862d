"""``diffpo label`` without a browser: candidate readers, the manifest (append, undo, resume,
repair), ties as label 0.5, the image route's path checks, and a labelled manifest training."""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from web_helpers import serve, shape_image, write_candidate_folder  # noqa: F401 - serve is a fixture

from diffpo.cli import main
from diffpo.config import DataConfig
from diffpo.data import DataError, load_pair_records
from diffpo.web import candidates
from diffpo.web.labels import Manifest

pytest.importorskip("starlette", reason="the web extra (starlette, uvicorn) is part of the test extra: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parents[2]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ candidates


def test_folder_layout_prompt_txt_or_captions(tmp_path):
    write_candidate_folder(tmp_path / "c", 2, 3)
    group = tmp_path / "c" / "p01"
    (group / "prompt.txt").unlink()
    for k in range(3):
        (group / f"c{k}.txt").write_text("a caption for all three\n")
    source = candidates.from_folder(tmp_path / "c")
    assert [(t.id, t.prompt, len(t.images)) for t in source.tasks] == [
        ("p00", "a red circle on a gray background", 3), ("p01", "a caption for all three", 3)]
    assert source.url_path(source.tasks[1].images[2]) == "p01/c2.png"


@pytest.mark.parametrize("breakage, message", [
    (lambda g: (g / "c1.png").unlink(), r"holds 1 image\(s\)"),
    (lambda g: ((g / "prompt.txt").unlink(), (g / "c0.txt").write_text("x"), (g / "c1.txt").write_text("y")), "2 different captions"),
    (lambda g: (g / "prompt.txt").unlink(), "no caption file"),
    (lambda g: (g / "c1.png").write_bytes(b"not a png"), "cannot read image"),
])
def test_folder_layout_errors_name_the_folder(tmp_path, breakage, message):
    write_candidate_folder(tmp_path / "c", 2)
    breakage(tmp_path / "c" / "p01")
    with pytest.raises(DataError, match=message) as err:
        candidates.from_folder(tmp_path / "c")
    assert "p01" in str(err.value)


def test_candidates_jsonl_paths_ids_and_confinement(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        shape_image("red", "circle", len(name)).save(tmp_path / name)
    lines = [{"prompt": "one", "images": ["a.png", "b.png"]}, {"id": "x7", "prompt": "two", "images": ["a.png", "b.png", "c.png"]}]
    (tmp_path / "cands.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = candidates.from_jsonl(tmp_path / "cands.jsonl")
    assert [(t.id, t.prompt, [p.name for p in t.images]) for t in source.tasks] == [("00000", "one", ["a.png", "b.png"]), ("x7", "two", ["a.png", "b.png", "c.png"])]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cands.jsonl").write_text(json.dumps({"prompt": "p", "images": ["../a.png", "../b.png"]}) + "\n")
    with pytest.raises(DataError, match="outside"):
        candidates.from_jsonl(tmp_path / "sub" / "cands.jsonl")


# ------------------------------------------------------------------------------- manifest


def test_answers_are_manifest_rows_and_undo_removes_only_the_last(tmp_path):
    source = candidates.from_folder(write_candidate_folder(tmp_path / "c", 3, 3))
    out = tmp_path / "pairs" / "mine"
    manifest = Manifest(out)
    a, b, c = source.tasks
    manifest.append(a, 2)
    manifest.append(b, "tie")
    manifest.append(c, 0)
    got = rows(out / "pairs.jsonl")
    rel = lambda task, k: f"../../c/{task.id}/c{k}.png"  # noqa: E731 - relative to the manifest's folder
    assert got == [
        {"prompt": a.prompt, "chosen": rel(a, 2), "rejected": rel(a, 0), "task": "p00"},
        {"prompt": a.prompt, "chosen": rel(a, 2), "rejected": rel(a, 1), "task": "p00"},
        {"prompt": b.prompt, "chosen": rel(b, 0), "rejected": rel(b, 1), "task": "p01", "tie": True},
        {"prompt": b.prompt, "chosen": rel(b, 0), "rejected": rel(b, 2), "task": "p01", "tie": True},
        {"prompt": c.prompt, "chosen": rel(c, 0), "rejected": rel(c, 1), "task": "p02"},
        {"prompt": c.prompt, "chosen": rel(c, 0), "rejected": rel(c, 2), "task": "p02"},
    ]
    with pytest.raises(ValueError, match="already answered"):
        manifest.append(a, 1)
    assert manifest.undo_last() == "p02"
    assert rows(out / "pairs.jsonl") == got[:4]
    assert Manifest(out).answered == {"p00", "p01"}  # what a restart resumes from

    # The reader ties: the two tie rows become label 0.5 and data.ties decides.
    kept, report = load_pair_records(DataConfig(source=str(out)))
    assert len(kept) == 2 and report.ties_dropped == 2
    kept, report = load_pair_records(DataConfig(source=str(out), ties="random"))
    assert len(kept) == 4 and report.ties_dropped == 0
    assert all(Path(r.chosen).is_file() and Path(r.rejected).is_file() for r in kept)


def test_restart_drops_a_partial_last_line_and_keeps_rows_it_did_not_write(tmp_path, caplog):
    source = candidates.from_folder(write_candidate_folder(tmp_path / "c", 2))
    out = tmp_path / "out"
    out.mkdir()
    foreign = json.dumps({"prompt": "by hand", "chosen": "x.png", "rejected": "y.png"}) + "\n"
    (out / "pairs.jsonl").write_text(foreign)
    Manifest(out).append(source.tasks[0], 1)
    with (out / "pairs.jsonl").open("a") as handle:
        handle.write('{"prompt": "half a row", "cho')
    with caplog.at_level(logging.WARNING):
        manifest = Manifest(out)
    assert "incomplete last line" in caplog.text
    assert manifest.answered == {"p00"}
    assert (out / "pairs.jsonl").read_text().endswith("}\n")
    assert manifest.undo_last() == "p00"
    assert manifest.undo_last() is None  # the row it did not write stays
    assert (out / "pairs.jsonl").read_text() == foreign


# ----------------------------------------------------------------------------- path checks


def test_image_paths_stay_inside_the_folder(tmp_path):
    from starlette.exceptions import HTTPException

    from diffpo.web.files import inside

    root = write_candidate_folder(tmp_path / "c", 1)
    (tmp_path / "secret.png").write_bytes((root / "p00" / "c0.png").read_bytes())
    os.symlink(tmp_path / "secret.png", root / "p00" / "link.png")
    assert inside(root, "p00/c0.png") == (root / "p00" / "c0.png").resolve()
    for bad in ("../secret.png", "p00/../../secret.png", str(tmp_path / "secret.png"), "p00/link.png", "/etc/passwd"):
        with pytest.raises(HTTPException) as err:
            inside(root, bad)
        assert err.value.status_code == 403, bad
    for missing in ("p00/nope.png", "p00/prompt.txt", "p00"):
        with pytest.raises(HTTPException) as err:
            inside(root, missing)
        assert err.value.status_code == 404, missing


# ------------------------------------------------------------------- labelled -> trained


def post(url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else b"", method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_labelled_manifest_trains_unchanged(tmp_path, serve, monkeypatch, caplog):
    """The real CLI serves 3 prompts x 3 candidates; answers through its API; diffpo train on OUT."""
    source = write_candidate_folder(tmp_path / "cands", 3, 3)
    out = tmp_path / "pairs" / "hand"
    server = serve("label", "--images", str(source), "--out", str(out))
    # Writes need application/json (no cross-site form post) and a local Host header (no DNS rebinding).
    for headers, status in (({"Content-Type": "text/plain"}, 415), ({"Content-Type": "application/json", "Host": "evil.example"}, 400)):
        request = urllib.request.Request(f"{server.url}/api/answer", data=b'{"task": "p00", "choice": 0}', method="POST", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == status
    assert not (out / "pairs.jsonl").exists() or (out / "pairs.jsonl").read_text() == ""
    for task, choice in (("p00", 2), ("p01", "tie"), ("p02", 0)):
        state = post(f"{server.url}/api/answer", {"task": task, "choice": choice})
    assert state["task"] is None and state["answered"] == state["total"] == 3
    server.kill()
    monkeypatch.chdir(REPO)
    with caplog.at_level(logging.INFO):
        code = main(["train", "--config", "configs/tiny.yaml", f"output_dir={tmp_path / 'run'}", f"data.source={out}",
                     "train.max_steps=2", "logging.progress=false", "logging.report_to=none"])
    assert code == 0
    assert f"{out}: 4 pairs kept of 6 rows; ties dropped 2" in caplog.text
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_pairs_candidates_writes_what_label_reads(tmp_path, monkeypatch):
    """N base-model samples per prompt -> candidates.jsonl -> the label session -> manifest rows."""
    import numpy as np
    from PIL import Image

    from diffpo import sampling
    from diffpo.data.candidates import write_candidates
    from diffpo.web.label_app import LabelSession

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "cands"
    args = ["pairs", "candidates", "--base", "toy:base", "--prompts", str(prompts), "--per-prompt", "3", "--out", str(out), "--steps", "2", "--batch-size", "4", "--seed", "5"]
    assert main(args) == 0
    lines = rows(out / "candidates.jsonl")
    assert [(r["id"], r["prompt"], r["seeds"]) for r in lines] == [("00000", "a red circle", [5, 6, 7]), ("00001", "a blue square", [8, 9, 10])]
    pixels = [np.asarray(Image.open(out / image)) for r in lines for image in r["images"]]
    assert len({p.tobytes() for p in pixels}) == 6  # six seeds, six different samples

    def no_sampling(*args, **kwargs):
        raise AssertionError("a rerun with every image on disk must not sample")

    monkeypatch.setattr(sampling, "generate", no_sampling)
    (out / "candidates.jsonl").unlink()  # resumable: with every image on disk, no model is needed
    assert write_candidates(None, ["a red circle", "a blue square"], out, per_prompt=3, seed=5, progress=False) == out / "candidates.jsonl"
    assert rows(out / "candidates.jsonl") == lines
    assert main([*args[:7], "1", *args[8:]]) == 2  # --per-prompt 1 is refused before loading anything

    session = LabelSession(candidates.from_jsonl(out / "candidates.jsonl"), tmp_path / "pairs")
    session.answer("00001", 1)
    session.skip("00000")
    assert session.state()["task"]["id"] == "00000" and session.state()["answered"] == 1
    assert [(r["chosen"], r["rejected"]) for r in rows(tmp_path / "pairs" / "pairs.jsonl")] == [
        ("../cands/images/00001_01.png", "../cands/images/00001_00.png"), ("../cands/images/00001_01.png", "../cands/images/00001_02.png")]
    # A restarted session has no history of its own: undo takes the manifest's last answer back.
    restarted = LabelSession(candidates.from_jsonl(out / "candidates.jsonl"), tmp_path / "pairs")
    assert restarted.state()["task"]["id"] == "00000" and restarted.state()["can_undo"]
    assert restarted.undo() == "00001"
    assert restarted.state()["task"]["id"] == "00001" and restarted.state()["answered"] == 0
    assert (tmp_path / "pairs" / "pairs.jsonl").read_text() == ""
    assert restarted.undo() is None and not restarted.state()["can_undo"]


def test_view_and_label_input_errors_are_one_line(tmp_path, capsys):
    assert main(["view", str(tmp_path)]) == 2
    assert "no results.json (expected the --out folder of diffpo eval)" in capsys.readouterr().err
    assert main(["label", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--images: no such folder" in err and "Traceback" not in err
