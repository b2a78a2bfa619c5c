"""Multi-label conditional image generation on i-CLEVR: data, judge, VAE, LDM, GAN."""
