"""``diffpo pairs from-images``: a folder of target images -> a pair dataset the trainer reads;
``diffpo pairs candidates``: N samples per prompt, to label by hand with ``diffpo label``."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_from_images(args: argparse.Namespace) -> int:
    from diffpo.config import ModelConfig
    from diffpo.data.from_images import build_pairs_from_images, list_images, read_prompts
    from diffpo.data.pairs import DataError
    from diffpo.models import load_components

    # Every input is checked before the model loads.
    if args.per_image < 1:
        raise DataError(f"--per-image must be >= 1, got {args.per_image}")
    chosen = list_images(args.chosen)
    prompts = read_prompts(args.prompts, chosen)
    rejected_prompts = read_prompts(args.rejected_prompts, chosen, "--rejected-prompts") if args.rejected_prompts else None
    from diffpo.sampling import resolve_settings, sampler_options

    sampler = sampler_options(args)
    components = load_components(ModelConfig(pretrained=args.base))
    sampler = resolve_settings(components, sampler)  # a bad setting fails before any sampling
    path = build_pairs_from_images(
        components, chosen, prompts, args.out, seed=args.seed, rejected_prompts=rejected_prompts, per_image=args.per_image,
        sampler=sampler, batch_size=args.batch_size, device=args.device,
    )
    print(f"{len(chosen) * args.per_image} pairs written to {path}; train with: diffpo train --config FILE data.source={path}")
    return 0


def cmd_candidates(args: argparse.Namespace) -> int:
    from diffpo.config import ModelConfig
    from diffpo.data.candidates import write_candidates
    from diffpo.data.pairs import DataError
    from diffpo.evaluate.prompts import load_prompts
    from diffpo.models import load_components

    if args.per_prompt < 2:  # checked before the model loads
        raise DataError(f"--per-prompt must be >= 2 (candidates are compared), got {args.per_prompt}")
    prompts = load_prompts(args.prompts)[: args.max_prompts]
    components = load_components(ModelConfig(pretrained=args.base))
    for module in (components.network, *components.frozen_modules()):
        module.to(args.device)
    sampler = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "resolution": args.resolution}
    path = write_candidates(components, prompts, args.out, per_prompt=args.per_prompt, seed=args.seed, sampler=sampler,
                            batch_size=args.batch_size, device=args.device)
    print(f"{len(prompts)} prompts x {args.per_prompt} candidates written to {path}; label them with: diffpo label --candidates {path} --out pairs/NAME")
    return 0


def register_cli(sub) -> None:
    pairs = sub.add_parser("pairs", help="build preference pair datasets")
    pairs_sub = pairs.add_subparsers(dest="pairs_command", required=True)
    p = pairs_sub.add_parser("from-images", help="chosen = your images, rejected = the base model's generations of the same prompts")
    p.add_argument("--chosen", required=True, type=Path, help="folder of target images (style, subject, safe content)")
    p.add_argument("--prompts", required=True, help="'captions' (sidecar .txt per image), a .jsonl (file, prompt) or a text file (one prompt per image, or one for all)")
    p.add_argument("--rejected-prompts", default=None, help="prompts for the rejected generations (default: --prompts), e.g. the class prompt for personalization")
    p.add_argument("--per-image", type=int, default=1, help="rejected generations per chosen image (DreamBooth: many class images for a few subject images)")
    p.add_argument("--base", required=True, help="base model: hub id, local folder, toy:base or tiny:sd")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0, help="rejected image k uses seed SEED+k")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    from diffpo.sampling import add_sampler_arguments

    add_sampler_arguments(p)
    p.set_defaults(func=cmd_from_images)

    p = pairs_sub.add_parser("candidates", help="N samples of a model per prompt, to label by hand with diffpo label --candidates")
    p.add_argument("--base", required=True, help="model: hub id, local folder, toy:base or tiny:sd")
    p.add_argument("--prompts", required=True, help="a .txt/.jsonl prompt file or a built-in set (as diffpo eval --prompts)")
    p.add_argument("--per-prompt", type=int, default=2, help="candidates per prompt (default 2: a left/right pair)")
    p.add_argument("--out", required=True, type=Path, help="folder for images/ and candidates.jsonl")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first K prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_candidates)
