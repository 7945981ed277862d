"""Helpers for the web tests: candidate folders, a real evaluation folder, the CLI as a server.

Not a conftest.py: the suite's tests import helpers with `from conftest import ...`, and a second
conftest module would take that name. Test modules import the fixtures below by name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (235, 200, 40)}


def shape_image(color: str, shape: str, k: int, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    box = (12 + 3 * k, 12 + 2 * k, 48 + 2 * k, 48 + k)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return image


def write_candidate_folder(root: Path, n_prompts: int, n_images: int = 2) -> Path:
    """``root/p<i>/`` with ``prompt.txt`` and ``n_images`` drawn candidates each."""
    colors, shapes = list(COLORS), ["circle", "square"]
    for i in range(n_prompts):
        color, shape = colors[i % len(colors)], shapes[i % 2]
        group = root / f"p{i:02d}"
        group.mkdir(parents=True)
        (group / "prompt.txt").write_text(f"a {color} {shape} on a gray background\n")
        for k in range(n_images):
            shape_image(color, shape if k % 2 == 0 else shapes[(i + 1) % 2], k).save(group / f"c{k}.png")
    return root


class BrightnessScorer:
    """A deterministic stand-in reward: mean pixel value (and a second one, its red share)."""

    def __init__(self, channel: int | None = None):
        self.channel = channel

    def score(self, images, prompts):
        import numpy as np

        return [float(np.asarray(im, dtype=np.float64)[..., self.channel].mean() if self.channel is not None else np.asarray(im, dtype=np.float64).mean()) / 255 for im in images]

    def describe(self):
        return {"name": "brightness", "channel": self.channel}


def write_eval_folder(out: Path, prompts: list[str], images_per_prompt: int = 2) -> Path:
    """A real ``diffpo eval`` output folder: ``evaluate_models`` + ``write_report`` with drawn images
    instead of a diffusion model (the sampler is replaced; files, statistics and layout are real)."""
    import torch

    from diffpo.evaluate import run as run_module

    def fake_generate(components, prompts, seeds, **kwargs):
        """One batch (the sampler's iter_generate protocol) that draws the prompt's shape; the base model gets the colour wrong for odd seeds, the tuned one never."""
        tuned = "LoRA" in components.source
        images = []
        for prompt, seed in zip(prompts, seeds):
            color = next(c for c in COLORS if c in prompt)
            if not tuned and seed % 2:
                color = list(COLORS)[(list(COLORS).index(color) + 1) % len(COLORS)]
            images.append(shape_image(color, "circle" if "circle" in prompt else "square", (seed * 3 + tuned) % 5))
        yield images

    models = [SimpleNamespace(source=name, extras={}, network=torch.nn.Identity(), frozen_modules=lambda: []) for name in ("toy:base", "toy:base + LoRA runs/mapo/final/pytorch_lora_weights.safetensors")]
    mp = pytest.MonkeyPatch()
    mp.setattr(run_module, "iter_generate", fake_generate)
    # No family behind the stand-in models: the settings are recorded as given.
    mp.setattr(run_module, "resolve_settings", lambda components, settings=None, **o: run_module.SamplerSettings.from_any(settings, **o))
    try:
        results = run_module.evaluate_models(*models, prompts, images_per_prompt=images_per_prompt, seed=0,
                                             scorers={"brightness": BrightnessScorer(), "redness": BrightnessScorer(0)},
                                             sampler={"num_inference_steps": 2}, out_dir=out, progress=False)
    finally:
        mp.undo()
    results["prompt_set"] = "test prompts"
    run_module.write_report(results, out)
    return out


# ------------------------------------------------------------------------- the CLI as a server


def diffpo_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


class Server:
    """``python -m diffpo ARGS --port 0`` in a subprocess; ``url`` is what it printed."""

    def __init__(self, *args: str, timeout: float = 60):
        self.proc = subprocess.Popen([sys.executable, "-m", "diffpo", *args, "--port", "0"], cwd=REPO, env=diffpo_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            match = re.search(r"open (http://\S+?)/?\s", line)
            if match:
                self.url = match.group(1)
                return
        self.proc.kill()
        raise AssertionError("the server printed no URL:\n" + "".join(self.lines) + (self.proc.stdout.read() or ""))

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when the machine or the terminal dies."""
        self.proc.kill()
        self.proc.wait(10)

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: SIGINT, then the exit status and the rest of the output."""
        self.proc.send_signal(signal.SIGINT)
        rest, _ = self.proc.communicate(timeout=20)
        return self.proc.returncode, "".join(self.lines) + rest

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(*args: str) -> Server:
        servers.append(Server(*args))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH: scripts/setup.sh installs it from the OS packages (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path)
        yield browser
        browser.close()
