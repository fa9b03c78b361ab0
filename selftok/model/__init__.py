"""The tokenizer model: layers, encoder, quantizer, MMDiT decoder, renderer, flow, token schedule, latent
adapters, the `SelftokTokenizer` that assembles them and the preset registry. It imports nothing of
`selftok.loaders`, `selftok.training` or `selftok.data`."""
