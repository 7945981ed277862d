"""Where does a tuned shapes-world model's grain come from? Controlled probes (issue 17).

Given the base model and tuned models (``diffpo demo`` runs' ``train/final`` folders), prints one
JSON line per probe with the grain (``diffpo.toy.quality``: mean |Laplacian| of the flat
background, 0 for a clean render), the whole-image Laplacian and the style reward (thinness):

* sampler probes on each tuned model: DDIM steps (10 / 25 / 50), DPM-Solver++, clipping off, and a
  *hand-over*: the tuned model denoises down to timestep ``--switch`` and the base model takes the
  last steps (if the grain goes away, it is made in the low-noise steps);
* guidance probes: no classifier-free guidance (``cfg1_10``), or guidance only above timestep 200
  / 400 (``gfrom200_10``; Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval");
* the denoising error per timestep of base and tuned models on clean renders of the held-out
  prompts (epsilon MSE at fixed noise): which noise levels the tuning damaged.

    python -m benchmarks.toy_grain_probe --tuned mapo=RUN/train/final sft=RUN2/train/final --per-prompt 4
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def _sample(components, networks, prompts, seeds, *, steps, switch=None, scheduler="ddim", clip=True, guidance=3.0, guidance_from=0):
    """The shapes world's DDIM loop (``diffpo.toy.sampling.sample_pixels``), with the network
    switched from ``networks[0]`` to ``networks[1]`` once the timestep is below ``switch``, and
    classifier-free guidance only at timesteps >= ``guidance_from`` (plain conditional below)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from diffpo.toy.sampling import initial_noise, to_pil

    if scheduler == "ddim":
        sched = DDIMScheduler.from_config(components.scheduler.config, clip_sample=clip, set_alpha_to_one=False)
    else:
        sched = DPMSolverMultistepScheduler.from_config(components.scheduler.config, algorithm_type="dpmsolver++", thresholding=clip, sample_max_value=1.0)
    family = components.family
    uncond = family.encode_prompts(components, [""])["encoder_hidden_states"]
    cond = family.encode_prompts(components, list(prompts))["encoder_hidden_states"]
    context = torch.cat([uncond.expand(len(prompts), -1, -1), cond])
    x = initial_noise(seeds, (3, 32, 32)) * 1.0
    sched.set_timesteps(steps)
    with torch.inference_mode():
        for t in sched.timesteps:
            net = networks[1] if switch is not None and int(t) < switch else networks[0]
            e_u, e_c = net(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            scale = guidance if int(t) >= guidance_from else 1.0
            x = sched.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    return to_pil(x)


def _measure(images, prompts) -> dict:
    from diffpo.toy.checker import detect
    from diffpo.toy.quality import grain, laplacian_energy
    from diffpo.toy.scorers import thinness

    found = [detect(im) for im in images]
    return {
        "grain": round(float(np.mean([grain(im) for im in images])), 4),
        "laplacian": round(float(np.mean([laplacian_energy(im) for im in images])), 4),
        "thinness": round(float(np.mean([thinness(im) for im in images])), 3),
        "color_acc": round(float(np.mean([f.color == p.color for f, p in zip(found, prompts)])), 3),
        "shape_acc": round(float(np.mean([f.shape == p.shape for f, p in zip(found, prompts)])), 3),
    }


def _errors_by_timestep(components, network, images, texts, timesteps, seed=0) -> list[float]:
    """Epsilon MSE of ``network`` on clean ``images`` at each timestep, one fixed noise draw."""
    x0 = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for im in images])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    cond = components.family.encode_prompts(components, texts)["encoder_hidden_states"]
    out = []
    with torch.inference_mode():
        for t in timesteps:
            tt = torch.full((len(x0),), t, dtype=torch.long)
            noisy = components.scheduler.add_noise(x0, noise, tt)
            out.append(round(float(((network(noisy, tt, encoder_hidden_states=cond).sample - noise) ** 2).mean()), 5))
    return out


def main() -> None:
    from diffpo.toy.base import ASSET_DIR, load_toy_model
    from diffpo.toy.render import render
    from diffpo.toy.tasks import prompt_split

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tuned", nargs="+", required=True, metavar="NAME=FOLDER")
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--switch", type=int, default=200, help="hand-over timestep from the tuned to the base model")
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--style", default="outline")
    parser.add_argument("--severity", type=float, default=0.5)
    parser.add_argument("--sampler-probes", default="ddim10,ddim25,ddim50,dpm10,noclip10,handover10")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    _, heldout = prompt_split(seed=0)
    prompts = [p for p in heldout for _ in range(args.per_prompt)]
    seeds = [args.seed + j for _ in heldout for j in range(args.per_prompt)]
    texts = [p.text for p in prompts]
    base = load_toy_model(str(ASSET_DIR))
    tuned = {name: load_toy_model(folder) for name, folder in (item.split("=", 1) for item in args.tuned)}

    renders = [render(p, style=args.style, severity=args.severity, seed=s) for p, s in zip(prompts, seeds)]
    print(json.dumps({"probe": "renders", "style": f"{args.style}@{args.severity}", **_measure(renders, prompts)}), flush=True)
    print(json.dumps({"probe": "base", "sampler": "ddim10", **_measure(_sample(base, [base.network], texts, seeds, steps=10), prompts)}), flush=True)

    timesteps = [5, 20, 50, 100, 200, 400, 700, 950]
    solid = [render(p, seed=s) for p, s in zip(prompts, seeds)]
    print(json.dumps({"probe": "eps_mse_by_t", "model": "base", "on": "solid", "t": timesteps, "mse": _errors_by_timestep(base, base.network, solid, texts, timesteps)}), flush=True)
    print(json.dumps({"probe": "eps_mse_by_t", "model": "base", "on": "target_style", "t": timesteps, "mse": _errors_by_timestep(base, base.network, renders, texts, timesteps)}), flush=True)
    for name, model in tuned.items():
        print(json.dumps({"probe": "eps_mse_by_t", "model": name, "on": "target_style", "t": timesteps, "mse": _errors_by_timestep(model, model.network, renders, texts, timesteps)}), flush=True)
        for probe in args.sampler_probes.split(","):
            kind, steps = probe.rstrip("0123456789"), int(probe[len(probe.rstrip("0123456789")):])
            options = {
                "ddim": {}, "dpm": {"scheduler": "dpm"}, "noclip": {"clip": False},
                "handover": {"switch": args.switch},
                "cfg1_": {"guidance": 1.0}, "gfrom200_": {"guidance_from": 200}, "gfrom400_": {"guidance_from": 400},
            }[kind]
            networks = [model.network, base.network]
            images = _sample(model, networks, texts, seeds, steps=steps, **options)
            print(json.dumps({"probe": "sampler", "model": name, "sampler": probe, **_measure(images, prompts)}), flush=True)


if __name__ == "__main__":
    main()
