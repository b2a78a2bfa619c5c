"""The serving side: numpy + onnxruntime (+ Pillow for images). Never imports torch."""
