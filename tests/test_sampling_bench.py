"""The sampling benchmark runs end to end on the CPU at toy size (a smoke run: it checks the harness,
not speed): random-weight pipeline saved to disk, a LoRA from `diffpo train`, `diffpo eval` with it,
and diffpo's sampler timed beside the diffusers pipeline with the same LoRA, giving the same images."""

import json

from benchmarks import sampling_bench


def test_smoke_run_times_both_samplers_on_the_same_images(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--arch", "tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--images", "2", "--batch-size", "2",
            "--repeats", "1", "--eval-prompts", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    result = sampling_bench.main(args)
    saved = json.loads(out.read_text())
    assert saved["ratio_diffpo_over_diffusers"] == result["ratio_diffpo_over_diffusers"] > 0
    assert set(saved["images_per_s"]) == {"diffpo", "diffusers"} and all(v > 0 for v in saved["images_per_s"].values())
    assert saved["resolution"] == 32 and saved["diffpo_sampler"]["scheduler"] == "euler"
    # diffpo applies the run's LoRA as diffusers' load_lora_weights does: identical images
    assert saved["same_images"]["max_abs_pixel_diff"] == 0
    assert saved["diffpo_train"]["returncode"] == 0 and saved["diffpo_eval"]["returncode"] == 0
    assert (tmp_path / "work" / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "work" / "eval" / "report.md").is_file()
