"""diffpo: align text-to-image diffusion models with preference data (MaPO, DMPO, Diffusion-DPO, SFT)."""

__version__ = "0.1.0"
