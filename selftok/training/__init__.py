"""Tokenizer training library: objectives, the data stream, held-out evaluation, perceptual loss, metrics.
The recipe that drives them is `selftok.train`."""
