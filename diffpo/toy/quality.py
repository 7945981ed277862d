"""Image quality in the shapes world: grain, measured where the truth says the image is flat.

Every render (``diffpo.toy.render``) has one background colour, constant over the canvas (its
jitter is per image, not per pixel), so away from the shape a clean image has no high-frequency
energy at all. A sample's grain is therefore the mean absolute Laplacian over its *flat
background*: the pixels whose 3x3 neighbourhood lies outside the checker's silhouette widened by
``MARGIN_PX`` (anti-aliased or blurred edges stay out of it). Clean renders score 0 exactly;
Gaussian noise of std s (0..1 scale) scores about 3.6 s (the 4-neighbour Laplacian of i.i.d. noise
has std sqrt(20) s, mean absolute value sqrt(20) s sqrt(2/pi)); speckles score their share of it.

``quality = 1 - grain`` (clipped at 0), so higher is better like every scorer, and 1.0 is a clean
render. What it does not measure, by design: blur (a blurred render's background is still flat)
and the prompt's content (a wrong colour or shape is faithfulness's job, ``shapes_color`` and
``shapes_shape``): the three numbers stay separate so that none hides another.

``laplacian_energy`` is the whole-image mean absolute Laplacian (edges included): issue 17's
measure, kept for comparison with its numbers; on renders it is the edges' energy (~0.05), so it
cannot say how far from clean a sample is, which is why the score uses the background only.
"""

from __future__ import annotations

import numpy as np

from diffpo.toy.checker import ImageLike, _dilate, segment

MARGIN_PX = 2
"""Pixels around the silhouette left out of the flat background: anti-aliasing spreads a render's
edge over 1 pixel, and a 0.6 px blur over one more."""


def _laplacian(pixels: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian of (H, W, C) values on the (H-2, W-2) interior."""
    centre = pixels[1:-1, 1:-1]
    return pixels[:-2, 1:-1] + pixels[2:, 1:-1] + pixels[1:-1, :-2] + pixels[1:-1, 2:] - 4 * centre


def laplacian_energy(image: ImageLike) -> float:
    """Mean absolute 4-neighbour Laplacian over the whole image (RGB in 0..1), edges included."""
    pixels = segment(image).pixels / 255.0
    return float(np.abs(_laplacian(pixels)).mean())


def flat_background(image: ImageLike) -> tuple[np.ndarray, np.ndarray]:
    """(pixels in 0..1, mask of the interior pixels whose 3x3 neighbourhood is flat background).

    The silhouette is the checker's (``segment``), so "the shape" is what faithfulness and the
    rewards read too. An image where the checker finds no shape is all background.
    """
    seg = segment(image)
    shape = seg.filled
    for _ in range(MARGIN_PX + 1):  # + 1: the Laplacian's own 3x3 footprint must stay off the shape
        shape = _dilate(shape)
    return seg.pixels / 255.0, ~shape[1:-1, 1:-1]


def grain(image: ImageLike) -> float:
    """Mean absolute Laplacian over the flat background (0 for a clean render)."""
    pixels, flat = flat_background(image)
    if not flat.any():  # a shape that fills the canvas leaves no background to judge
        return 0.0
    return float(np.abs(_laplacian(pixels))[flat].mean())


def quality(image: ImageLike) -> float:
    """1 - grain, clipped at 0: 1.0 for a clean render, lower the grainier."""
    return max(0.0, 1.0 - grain(image))
