"""Faithfulness of a toy base model's samples under several sampler settings (pick the defaults).

    python -m studies.sampler_sweep MODEL_DIR --device cuda --out sweep.json
"""

import argparse
import itertools
import json

from diffpo.toy.base import measure_faithfulness


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m studies.sampler_sweep", description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for steps, guidance, clip in itertools.product((10, 25), (1.5, 3.0, 5.0), (True, False)):
        result = measure_faithfulness(args.model, per_prompt=args.per_prompt, steps=steps, guidance_scale=guidance, clip_sample=clip, device=args.device)
        rows.append({"steps": steps, "guidance": guidance, "clip_sample": clip, **result})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
