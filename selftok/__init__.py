"""Selftok: a discrete image tokenizer whose tokens follow the reverse diffusion process (arXiv 2505.07538).

Shape letters used across the project: B batch, K tokens per image, N image patches, L sequence length,
V vocabulary, G group size, C/H/W latent channels/height/width. Flow time t = 1 is pure noise, t = 0 clean.
"""
