"""The numpy core: labels, errors, noise, the diffusion maths, the one sampling loop, best-of-N selection.

Nothing here imports torch or any other project package, and the modules import each other relatively, so the
runtime (no torch) uses them as they are and the Triton repository ships this folder as it is."""
