"""Inpainting with an ordinary (4-channel) UNet, the bundled shapes model, a mask over part of
a red object: the known latents come through the blend exactly, and the pixels outside the
mask still change, because the VAE decoder mixes neighbouring latents (diffusers' images change
the same); keep_unmasked=True pastes the input's pixels back there (AUTOMATIC1111's overlay)."""
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
import tiny_sd  # noqa: E402
from diffusers import StableDiffusionInpaintPipeline  # noqa: E402

import nanodiffusion  # noqa: E402
from nanodiffusion.formats.diffusers import save_diffusers_folder  # noqa: E402
from nanodiffusion.data import shapes as shapes_data  # noqa: E402
from nanodiffusion.pipelines.images import from_pil  # noqa: E402

PROMPT, SEED = "a purple circle", 0


@pytest.fixture(scope="module")
def case():
    """Eval scene 48 (a red object) masked from the left edge to half way across the object."""
    pipe = nanodiffusion.load("shapes")
    image, _, attributes = shapes_data.sample(48, split="eval")
    red = next(o for o in attributes["objects"] if o["colour"] == "red")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :int(red["cx"])] = 255  # white: repaint
    return pipe, image, Image.fromarray(mask), mask == 0


def test_blend_keeps_the_known_latents_and_matches_diffusers(case, tmp_path):
    pipe, image, mask, outside = case
    with tiny_sd.latents_of(pipe.vae) as seen:
        got = pipe.inpaint(PROMPT, image, mask, seed=SEED)
    gen = torch.Generator().manual_seed(SEED)  # the first draw: the image's posterior sample
    with torch.no_grad():  # as inpaint runs it (the same attention kernel)
        init = pipe._encode(from_pil(image), gen)
    final = seen[0] * pipe.vae.config.scaling_factor
    keep = torch.nn.functional.interpolate(torch.from_numpy(outside).float()[None, None],
                                           size=final.shape[-2:]) > 0.5  # nearest, diffusers'
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(final[keep.expand_as(final)], init[keep.expand_as(init)])
    ref = StableDiffusionInpaintPipeline.from_pretrained(save_diffusers_folder(pipe, tmp_path))
    ref.set_progress_bar_config(disable=True)
    d = pipe.defaults
    want = ref(PROMPT, image=image, mask_image=mask, num_inference_steps=d.steps,
               guidance_scale=d.guidance, width=64, height=64, output_type="np",
               generator=torch.Generator().manual_seed(SEED)).images
    tiny_sd.assert_close_images(tiny_sd.as_array(got), want)
    original = np.asarray(image, dtype=np.int16)
    changed = np.abs(np.asarray(got[0], dtype=np.int16) - original)[outside].max()
    assert changed > 32  # the decoder's doing, in diffusers' images as in ours


def test_keep_unmasked_pastes_the_input_outside_the_mask(case):
    pipe, image, mask, outside = case
    plain = pipe.inpaint(PROMPT, image, mask, seed=SEED, n=2)
    kept = pipe.inpaint(PROMPT, image, mask, seed=SEED, n=2, keep_unmasked=True)
    original = np.asarray(image)
    for a, b in zip(plain, kept):
        assert np.array_equal(np.asarray(b)[outside], original[outside])
        assert np.array_equal(np.asarray(b)[~outside], np.asarray(a)[~outside])
        assert b.info["parameters"] == a.info["parameters"]
    with pytest.raises(ValueError, match="keep_unmasked must be True or False, got 'yes'"):
        pipe.inpaint(PROMPT, image, mask, seed=SEED, keep_unmasked="yes")
