"""Images as arrays: model range [-1, 1] (N, 3, H, W) to uint8 (N, H, W, 3), and the grids the course shows."""
from __future__ import annotations

import numpy as np


def to_uint8(images) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] (torch or numpy) -> (N, H, W, 3) uint8 for saving."""
    x = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    return np.clip((x.transpose(0, 2, 3, 1) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def image_grid(images, cols: int = 8, pad: int = 2) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> one uint8 RGB grid image, `cols` per row (the course shows 8); fewer
    images than `cols` make one row of that many, as torchvision's make_grid does."""
    imgs = to_uint8(images)
    n, h, w, _ = imgs.shape
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out


def rows_grid(*rows, n: int = 16) -> np.ndarray:
    """Image batches in [-1, 1] stacked as rows of their first n images each (e.g. originals over reconstructions)."""
    return np.concatenate([np.concatenate(list(to_uint8(r[:n])), axis=1) for r in rows], axis=0)
