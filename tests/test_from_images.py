"""`diffpo pairs from-images`: folder -> pairs the trainer reads; resumable; clear bad-input errors."""

import json

import pytest
from PIL import Image

from diffpo import sampling
from diffpo.cli import main
from diffpo.config import DataConfig
from diffpo.data import DataError, load_pair_records
from diffpo.data.from_images import build_pairs_from_images, list_images, read_prompts


@pytest.fixture
def chosen_dir(tmp_path):
    folder = tmp_path / "chosen"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (32, 32), (40 * i, 200, 30)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a green circle on a black background {i}")
    return folder


def test_end_to_end_via_cli_then_train(chosen_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green circle on a black background\n")  # one prompt for all images
    out = tmp_path / "pairs"
    code = main(["pairs", "from-images", "--chosen", str(chosen_dir), "--prompts", str(prompts), "--base", "toy:base", "--out", str(out), "--steps", "2", "--batch-size", "2"])
    assert code == 0
    records, report = load_pair_records(DataConfig(source=str(out)))
    assert report.kept == 5
    assert sorted(r.open("chosen").getpixel((0, 0)) for r in records) == sorted((40 * i, 200, 30) for i in range(5))
    assert all(r.open("rejected").size == (32, 32) for r in records)
    code = main(["train", f"output_dir={tmp_path / 'run'}", f"data.source={out}", "model.pretrained=toy:base", "model.family=sd",
                 "train.max_steps=1", "train.batch_size=2", "logging.report_to=none", "logging.progress=false"])
    assert code == 0 and (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1


def test_killed_midway_resumes_with_each_image_paired_once(chosen_dir, tmp_path, monkeypatch):
    from diffpo.config import ModelConfig
    from diffpo.models import load_components

    components = load_components(ModelConfig(pretrained="toy:base"))
    images = list_images(chosen_dir)
    prompts = read_prompts("captions", images)
    calls = []
    real = sampling.generate

    def flaky(*args, **kw):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user killed it during the second batch
        return real(*args, **kw)

    monkeypatch.setattr(sampling, "generate", flaky)
    out = tmp_path / "pairs"
    with pytest.raises(KeyboardInterrupt):
        build_pairs_from_images(components, images, prompts, out, batch_size=2, sampler={"num_inference_steps": 2}, progress=False)
    assert len(list((out / "rejected").glob("*.png"))) == 2 and not (out / "pairs.jsonl").exists()

    calls.clear()
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    build_pairs_from_images(components, images, prompts, out, batch_size=2, sampler={"num_inference_steps": 2}, progress=False)
    assert calls == [2, 1]  # only the 3 missing images were generated
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert sorted(r["chosen"].split("/")[-1] for r in rows) == [f"img{i}.png" for i in range(5)]
    assert len({r["rejected"] for r in rows}) == 5 and [r["prompt"] for r in rows] == prompts


def test_bad_inputs_are_clear_errors(chosen_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(empty)
    (chosen_dir / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        list_images(chosen_dir)
    (chosen_dir / "broken.png").unlink()
    images = list_images(chosen_dir)
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    with pytest.raises(DataError, match="2 prompts for 5 images"):
        read_prompts(str(two), images)
    (chosen_dir / "img3.txt").unlink()
    with pytest.raises(DataError, match="no caption file .*img3.txt"):
        read_prompts("captions", images)
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"file": "img0.png", "prompt": "x"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match="p.jsonl, line 2"):
        read_prompts(str(bad), images)
    code = main(["pairs", "from-images", "--chosen", str(chosen_dir), "--prompts", str(two), "--base", "toy:base", "--out", str(tmp_path / "o")])
    assert code == 2 and "two.txt: 2 prompts for 5 images" in capsys.readouterr().err  # checked before any model loads
    one = tmp_path / "one.txt"
    one.write_text("a prompt\n")
    code = main(["pairs", "from-images", "--chosen", str(chosen_dir), "--prompts", str(one), "--base", "/no/such/model", "--out", str(tmp_path / "o")])
    assert code == 2 and "model folder not found: /no/such/model" in capsys.readouterr().err


def test_rejected_prompts_and_per_image_via_cli(chosen_dir, tmp_path, monkeypatch):
    subject, klass = tmp_path / "subject.txt", tmp_path / "class.txt"
    subject.write_text("a red sks star on a white background\n")
    klass.write_text("a red star on a white background\n")
    prompts_seen = []
    real = sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda c, p, s, **k: (prompts_seen.extend(p), real(c, p, s, **k))[1])
    out = tmp_path / "pairs"
    args = ["pairs", "from-images", "--chosen", str(chosen_dir), "--prompts", str(subject), "--rejected-prompts", str(klass),
            "--per-image", "3", "--base", "toy:base", "--out", str(out), "--steps", "2", "--batch-size", "4", "--seed", "7"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and [r["seed"] for r in rows] == list(range(7, 22))
    assert [r["chosen"].split("/")[-1] for r in rows[:4]] == ["img0.png"] * 3 + ["img1.png"]
    assert all(r["prompt"] == "a red sks star on a white background" and r["rejected_prompt"] == "a red star on a white background" for r in rows)
    assert prompts_seen == ["a red star on a white background"] * 15  # rejected images come from the class prompt
    records, _ = load_pair_records(DataConfig(source=str(out)))
    assert len({r.rejected for r in records}) == 15 and records[0].rejected_prompt == "a red star on a white background"
    # Run again: nothing is regenerated and the manifest is the same.
    prompts_seen.clear()
    assert main(args) == 0
    assert prompts_seen == [] and [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()] == rows


def test_rejected_prompt_errors_name_the_option(chosen_dir, tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("a prompt\n")
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    base = ["pairs", "from-images", "--chosen", str(chosen_dir), "--prompts", str(one), "--base", "toy:base", "--out", str(tmp_path / "o")]
    assert main(base + ["--rejected-prompts", str(two)]) == 2
    assert "two.txt: 2 prompts for 5 images" in capsys.readouterr().err
    assert main(base + ["--rejected-prompts", str(tmp_path / "missing.txt")]) == 2
    assert "--rejected-prompts: no such file" in capsys.readouterr().err
    assert main(base + ["--per-image", "0"]) == 2
    assert "per_image (--per-image): must be >= 1, got 0" in capsys.readouterr().err
