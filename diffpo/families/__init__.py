"""The model families, one module each: ``sd`` (SD 1.x/2.x, pixel-space models), ``sdxl``, ``sd3``
and ``flux``. Importing this package registers them (``diffpo.family.register_family``).

Each family follows the protocol of ``diffpo.family.Family``: ``load`` reads a diffusers folder or
hub id, ``encode_prompts`` returns batch-first conditioning tensors (the trainer duplicates them
for ``[winners; losers]``), ``predict`` runs the denoiser and returns a prediction with the
latents' shape (B, C, H, W), ``build_pipeline`` assembles the diffusers pipeline that ``save_full``
writes and that ``diffpo.sampling.generate`` samples with (the class attribute
``sampling_default_settings`` gives the family's steps, guidance and scheduler), and LoRA saves
through the pipeline's ``save_lora_weights``. On the same class a family declares its pipeline
classes for ``model.family: auto``, its tiny models, its compile blocks and its text encoders
(``diffpo.family`` lists them), so adding a family is one module here plus its tests.

SD 2.x v-prediction needs no family: the ``sd`` family with a scheduler whose
``prediction_type`` is ``v_prediction`` trains against the velocity (``diffpo.objectives``).

Per-sample error on flow-matching models (SD3, Flux)
-----------------------------------------------------
MaPO, DMPO and Diffusion-DPO were published, with code, for DDPM-type UNets (SD 1.5 / SDXL); no
public code applies them to flow models, so this is our definition, stated once here:

- x_t = (1 - sigma) x0 + sigma * noise, with the pair's two images sharing noise and sigma;
- the network predicts a velocity and ``err = mean((v_pred - (noise - x0))^2)`` over all latent
  dimensions (float32), per image, like the epsilon MSE of the DDPM case;
- no extra loss weighting (diffusers' ``weighting_scheme="none"``) and no output preconditioning
  (train_dreambooth_lora_sd3.py's ``--precondition_outputs`` is not used: it would weight the
  error by sigma^2);
- timesteps are drawn logit-normal(0, 1) on the scheduler's (shifted) sigma grid, as SD3's
  training script does (``compute_density_for_timestep_sampling``).
The objectives then use these errors exactly as they use epsilon errors (beta and any
SNR-dependent term keep their DDPM meaning only approximately: tune beta per family).
"""

from diffpo.families import sd, sdxl, sd3, flux  # noqa: F401, I001  (each registers its family; this order is the order error messages list them in)
