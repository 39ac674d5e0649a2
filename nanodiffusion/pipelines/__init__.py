"""The pipelines, where the parts meet: sd.py (Stable Diffusion: txt2img, img2img, inpaint),
unclip.py (DALL·E 2: prior -> decoder; variations, edits, interpolation, captions), and what
both use: settings.py (a call's settings resolved against the model's defaults, once),
checks.py (every input check), images.py (PIL <-> tensors, grids, masks), rerank.py
(best-of-N by CLIP). Both pipelines offer the server the same surface: `decode_latents`,
`defaults`, and images carrying their parameters (info["parameters"], the A1111 text) and
the Settings they were made with (info["settings"])."""
