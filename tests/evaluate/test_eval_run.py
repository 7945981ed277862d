"""``diffpo eval`` end to end on the tiny in-process SD model: prompt sets, loading a LoRA or a
training checkpoint into a copy of the base network, same-seed sampling, image reuse, the report
files, and a win rate that can be recomputed from the saved per-image scores."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffpo.cli import main
from diffpo.config import config_from_dict
from diffpo.evaluate import SCORERS, summarize
from diffpo.evaluate import run as run_module
from diffpo.evaluate.grid import image_grid, save_comparison_grid
from diffpo.evaluate.prompts import load_prompts
from diffpo.evaluate.run import EvalError, load_tuned
from diffpo.toy.grammar import all_prompts, split_prompts
from diffpo.train import train

PROMPTS = ["a red circle on a gray background", "a blue square on a white background"]


class Brightness:
    """A cheap stand-in reward model: mean grey level in [0, 1]."""

    name = "brightness"

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        return [float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255) for image in images]

    def describe(self) -> dict:
        return {"name": self.name}


class Checksum(Brightness):
    """A scorer with no relation to quality, so wins and losses mix: a CRC of the pixels."""

    name = "checksum"

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        return [float(zlib.crc32(image.tobytes()) % 1000) for image in images]


@pytest.fixture(autouse=True)
def test_scorers(monkeypatch):
    """Register the stand-in scorers for one test, leaving the global registry as it was."""
    monkeypatch.setitem(SCORERS, "brightness", lambda **kw: Brightness())
    monkeypatch.setitem(SCORERS, "checksum", lambda **kw: Checksum())


# ------------------------------------------------------------------------------------ prompts


def test_text_prompts_skip_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a header\na red circle\n\n   \n  a blue square  \n# trailing\n")
    assert load_prompts(str(path)) == ["a red circle", "a blue square"]


def test_jsonl_prompts_take_prompt_or_caption(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"caption": "two", "id": 3}\n{"prompt": "three", "caption": "ignored"}\n')
    assert load_prompts(str(path)) == ["one", "two", "three"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "ok"}\n{"text": "no key"}\n', r"p.jsonl:2: no 'prompt' or 'caption' key \(keys: text\)"),
        ('{"prompt": "ok"}\n{"prompt": ""}\n', r"p.jsonl:2: 'prompt' must be a non-empty string"),
        ('{"prompt": "ok"}\n{oops\n', r"p.jsonl:2: not valid JSON"),
        ('["a list"]\n', r"p.jsonl:1: expected a JSON object"),
        ("\n\n", r"prompt set '.*p.jsonl' holds no prompts"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(EvalError, match=message):
        load_prompts(str(path))


def test_missing_and_empty_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(EvalError, match=r"prompt set 'nope.txt': no such file, and not a built-in set \(built-in: shapes-heldout, shapes-all\)"):
        load_prompts("nope.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(EvalError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))


def test_builtin_shapes_sets():
    train_set, heldout = split_prompts(all_prompts(), heldout_fraction=0.2, seed=0)
    assert load_prompts("shapes-heldout") == [p.text for p in heldout]
    assert load_prompts("shapes-all") == [p.text for p in all_prompts()]
    assert not set(load_prompts("shapes-heldout")) & {p.text for p in train_set}


# --------------------------------------------------------------------------------------- grid


def test_grid_upscales_tiny_images_and_labels_rows_and_columns():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    plain = image_grid([[red, blue]], scale=2)
    assert plain.getpixel((plain.width - 10, plain.height - 10)) == (0, 0, 255)  # nearest: no blending
    labelled = image_grid([[red, blue], [blue, red]], row_labels=["base: a red circle", "tuned"], col_labels=["seed 0", "seed 1"])
    assert labelled.width > 2 * 128 and labelled.height > 2 * 128  # auto scale: cells of >= 128 px
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        image_grid([[red], [blue]], row_labels=["x"])


def test_comparison_grid_has_base_and_tuned_row_per_prompt(tmp_path):
    image = Image.new("RGB", (32, 32), "gray")
    grid = save_comparison_grid([[image] * 5] * 3, [[image] * 5] * 3, ["a"] * 3, tmp_path / "g.png", max_prompts=2, per_prompt=3)
    one_row = save_comparison_grid([[image] * 3], [[image] * 3], ["a"], tmp_path / "one.png")
    assert (tmp_path / "g.png").is_file()
    assert grid.width == one_row.width and grid.height > 1.9 * one_row.height  # 3 columns; 4 rows vs 2


# ------------------------------------------------------------------------------ tiny training


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(base model folder, LoRA run folder): 2 LoRA steps, rank 4 with alpha 8 (not alpha = rank)."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "pairs"
    data.mkdir()
    lines = []
    for i in range(4):
        chosen = Image.new("RGB", (32, 32), (128, 128, 128))
        ImageDraw.Draw(chosen).ellipse((6 + i, 6, 24 + i, 24), fill=(250, 200, 40))
        rejected = Image.new("RGB", (32, 32), (128, 128, 128))
        ImageDraw.Draw(rejected).rectangle((8, 8, 22, 22), fill=(20, 30, 60 + 10 * i))
        chosen.save(data / f"w{i}.png")
        rejected.save(data / f"l{i}.png")
        lines.append(json.dumps({"prompt": PROMPTS[i % 2], "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
    (data / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config_from_dict(
        {
            "output_dir": str(root / "run"),
            "seed": 3,
            "model": {"pretrained": "tiny:sd", "lora": {"enabled": True, "rank": 4, "alpha": 8.0}},
            "data": {"source": str(data), "resolution": 32},
            "loss": {"name": "sft"},
            "train": {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-2, "checkpoint_every": 2},
            "logging": {"report_to": "none", "progress": False},
        }
    )
    train(cfg, cache_dir=root / "models")
    return root / "models" / "sd", root / "run"


def eval_args(model: Path, out: Path, *tuned: str, prompts: Path | str = "shapes-heldout") -> list[str]:
    return [
        "eval", "--model", str(model), *tuned, "--prompts", str(prompts), "--max-prompts", "2",
        "--scorers", "brightness", "--images-per-prompt", "2", "--seed", "5", "--steps", "2", "--out", str(out),
    ]  # fmt: skip


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_eval_end_to_end_reuses_images_and_reports(trained, tmp_path, monkeypatch, capsys):
    model, run = trained
    out = tmp_path / "eval"
    assert main(eval_args(model, out, "--lora", str(run / "final"))) == 0
    assert "| brightness |" in capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    assert {"models", "num_prompts", "images_per_prompt", "seed", "sampler", "scorers", "images_dir", "reused_images"} <= set(results)
    assert (results["num_prompts"], results["images_per_prompt"], results["seed"], results["reused_images"]) == (2, 2, 5, False)
    assert results["sampler"] == {  # the sd family's defaults, resolved and recorded
        "num_inference_steps": 2, "guidance_scale": 7.5, "resolution": 32, "scheduler": "ddim", "dtype": None,
        "cpu_offload": False, "vae_tiling": False, "vae_slicing": False, "clip_sample": None, "batch_size": 64,
    }
    summary = results["scorers"]["brightness"]
    assert summary["n"] == 4 and summary["scorer"] == {"name": "brightness"} and 0.0 <= summary["win_rate"] <= 1.0
    assert (out / "report.md").read_text().count("| brightness |") == 1
    assert Image.open(out / "grid.png").size[0] > 128

    index = [json.loads(line) for line in (out / "images" / "index.jsonl").read_text().splitlines()]
    assert [(row["prompt_index"], row["seed"]) for row in index] == [(0, 5), (0, 6), (1, 5), (1, 6)]
    images = out / "images"
    assert all(np.abs(pixels(images / row["base"]) - pixels(images / row["tuned"])).max() > 0 for row in index)

    # The same seeds give the same base images in a fresh run.
    again = tmp_path / "again"
    assert main(eval_args(model, again, "--lora", str(run / "final"))) == 0
    for row in index:
        assert np.array_equal(pixels(images / row["base"]), pixels(again / "images" / row["base"]))

    # Re-running into the same folder scores the saved images without sampling.
    def no_sampling(*args, **kwargs):
        raise AssertionError("generate called although the images could be reused")

    monkeypatch.setattr(run_module, "iter_generate", no_sampling)
    assert main(eval_args(model, out, "--lora", str(run / "final"))) == 0
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["reused_images"] is True and rerun["scorers"] == results["scorers"]
    # ... but other sampler settings make new images.
    with pytest.raises(AssertionError, match="generate called"):
        main(eval_args(model, out, "--lora", str(run / "final"), "--guidance", "5"))


def test_win_rate_recomputes_from_saved_per_image_scores(trained, tmp_path):
    model, run = trained
    out = tmp_path / "eval"
    args = eval_args(model, out, "--checkpoint", str(run / "checkpoint-2"))
    args[args.index("brightness")] = "brightness,checksum"
    args[args.index("--max-prompts") + 1] = "4"
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    saved = json.loads((out / "results.json").read_text())["scorers"]
    for name in ("brightness", "checksum"):
        tuned = [row["tuned"][name] for row in rows]
        base = [row["base"][name] for row in rows]
        expected = summarize(tuned, base, groups=[row["prompt_index"] for row in rows])
        assert saved[name]["win_rate_ci"] == pytest.approx(expected.pop("win_rate_ci"))
        assert {k: saved[name][k] for k in expected} == pytest.approx(expected)
    assert 0 < saved["checksum"]["win_rate"] < 1  # a mixed outcome, so the CI is not degenerate


# ------------------------------------------------------------------------------------ loading


def forward(network: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 8, 32, generator=generator)
    with torch.no_grad():
        return network(x, torch.tensor([500]), encoder_hidden_states=hidden).sample


def test_lora_and_checkpoint_load_the_same_trained_network(trained):
    model, run = trained
    base, from_lora = load_tuned(str(model), lora=str(run))  # the run folder resolves to final/
    _, from_checkpoint = load_tuned(str(model), checkpoint=str(run / "checkpoint-2"))
    torch.testing.assert_close(forward(from_lora.network), forward(from_checkpoint.network), rtol=0, atol=1e-6)
    assert not torch.allclose(forward(base.network), forward(from_lora.network))
    scalings = {s for m in from_lora.network.modules() if hasattr(m, "scaling") for s in m.scaling.values()}
    assert scalings == {2.0}  # alpha 8 / rank 4, read from the run's config.yaml
    assert from_lora.text_encoders[0] is base.text_encoders[0]  # frozen parts are shared


def test_full_checkpoint_and_full_tuned_model(trained, tmp_path):
    from safetensors.torch import save_file

    import shutil

    from diffusers import UNet2DConditionModel

    model, _ = trained
    # --tuned-model: another full pipeline folder (the base's with its UNet shifted), not the base itself
    other = tmp_path / "tuned_pipeline"
    shutil.copytree(model, other)
    unet = UNet2DConditionModel.from_pretrained(other / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02)
    unet.save_pretrained(other / "unet")
    base, tuned_full = load_tuned(str(model), tuned_model=str(other))
    assert not torch.allclose(forward(base.network), forward(tuned_full.network))
    for key, value in tuned_full.network.state_dict().items():
        torch.testing.assert_close(value, unet.state_dict()[key], rtol=0, atol=0)
    state = {k: v + 0.01 for k, v in base.network.state_dict().items()}
    (tmp_path / "checkpoint-1").mkdir()
    save_file(state, tmp_path / "checkpoint-1" / "model.safetensors")
    _, tuned = load_tuned(str(model), checkpoint=str(tmp_path / "checkpoint-1"))
    for key, value in tuned.network.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "tuned, message",
    [
        (lambda model, run: ["--lora", str(model)], "is a full pipeline folder, not a LoRA; pass it as the tuned model"),
        (lambda model, run: ["--lora", str(run / "nope")], "LoRA not found"),
        (lambda model, run: ["--checkpoint", str(run / "final")], "no model.safetensors"),
    ],
    ids=["lora-is-a-pipeline", "lora-missing", "checkpoint-without-weights"],
)
def test_bad_tuned_weights_are_one_line_errors(trained, tmp_path, capsys, tuned, message):
    model, run = trained
    assert main(eval_args(model, tmp_path / "out", *tuned(model, run))) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_scorer_lists_valid_names(trained, tmp_path, capsys):
    model, run = trained
    args = eval_args(model, tmp_path / "out", "--lora", str(run))
    args[args.index("brightness")] = "brightness,pickscor"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown scorer(s) pickscor; valid: " in err and "pickscore" in err and "brightness" in err
