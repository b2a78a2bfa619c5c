"""The judge without torch: ONNX scores and the official top-k metric in numpy."""
from __future__ import annotations

import numpy as np

from runtime.models import ExportFolder


def topk_hits(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image (hits, k): top-k of the scores (k = number of labels) counted against the labels.

    Ranks by a stable sort, so exactly equal scores break toward the lower class index."""
    k = labels.sum(1).round().astype(np.int64)
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.array([labels[i, order[i, :k[i]]].sum() for i in range(len(labels))]).round().astype(np.int64)
    return hits, k


def judge_scores(export: ExportFolder, images: np.ndarray, name: str = "judge", batch: int = 256) -> np.ndarray:
    """Logits (N, 24) for images (N, 3, 64, 64) float32 in [-1, 1]."""
    out = [export.run(name, {"images": np.ascontiguousarray(images[i:i + batch], np.float32)})[1]
           for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, len(export.labels)), np.float32)


def accuracy(export: ExportFolder, images: np.ndarray, labels: np.ndarray, name: str = "judge") -> float:
    hits, k = topk_hits(judge_scores(export, images, name), labels)
    return float(hits.sum() / max(k.sum(), 1))
