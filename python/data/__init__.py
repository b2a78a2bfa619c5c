"""Data: the official i-CLEVR format (dataset.py) and the synthetic renderer (render.py, synthetic.py)."""
