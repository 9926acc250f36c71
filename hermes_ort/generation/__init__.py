"""Decoding: the KV cache through stages, sampling, tokenizers, text in and out."""
