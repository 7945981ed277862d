"""Studies over diffpo's public API: scripts with their own arguments, run from the repository root.

    python -m studies.compare --out runs/compare               # issue 17's method comparison
    python -m studies.personalize --out personalize_out --seeds 0,1,2
    python -m studies.sampler_sweep diffpo/assets/toy_base --out sweep.json

They use diffpo's public modules and the shapes-world plugin's public functions; the package does
not import them. Their committed results (summaries, plots, per-run reports; not the per-step
logs) live under ``benchmarks/results``.
"""
