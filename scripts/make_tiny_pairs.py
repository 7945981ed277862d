"""Regenerate data/tiny_pairs: 16 shapes-world pairs (chosen = striped style, rejected = solid).

    .venv/bin/python scripts/make_tiny_pairs.py
"""

from pathlib import Path

from diffpo.data import write_manifest
from diffpo.toy.grammar import all_prompts
from diffpo.toy.render import render

out = Path(__file__).resolve().parents[1] / "data" / "tiny_pairs"
(out / "images").mkdir(parents=True, exist_ok=True)
rows = []
for i, prompt in enumerate(all_prompts()[::3][:16]):
    render(prompt, style="striped", severity=1.0, seed=i).save(out / "images" / f"{i:02d}_chosen.png")
    render(prompt, style="solid", seed=1000 + i).save(out / "images" / f"{i:02d}_rejected.png")
    rows.append({"prompt": prompt.text, "chosen": f"images/{i:02d}_chosen.png", "rejected": f"images/{i:02d}_rejected.png"})
print(write_manifest(out, rows))
