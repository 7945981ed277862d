"""benchmarks/warm_start.py: its CPU stand-in has SDXL's structure (what Dynamo's tracing cost depends
on), only narrower."""

from collections import Counter

from benchmarks.warm_start import sdxl_like_unet


def test_stand_in_has_sdxl_block_structure():
    unet = sdxl_like_unet(width=32)
    kinds = Counter(type(m).__name__ for m in unet.modules())
    # SDXL base: 70 BasicTransformerBlocks in 11 Transformer2DModels (depths 2 in the 64-px blocks,
    # 10 in the 32-px ones and the mid block), 2 per down block and 3 per up block; 17 resnets (2 per down block, 2 in the mid block, 3 per up block)
    assert kinds["BasicTransformerBlock"] == 70 and kinds["Transformer2DModel"] == 11
    depths = Counter(len(m.transformer_blocks) for m in unet.modules() if type(m).__name__ == "Transformer2DModel")
    assert depths == {2: 5, 10: 6}
    assert kinds["ResnetBlock2D"] == 17 and kinds["Downsample2D"] == 2 and kinds["Upsample2D"] == 2
    assert unet.config.addition_embed_type == "text_time" and tuple(unet.config.block_out_channels) == (32, 64, 128)
