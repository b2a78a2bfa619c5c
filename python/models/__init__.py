"""The networks (VAE, denoiser, generators, classifiers, judge), their weights folders, and the torch adapters of
the core sampling loop."""
