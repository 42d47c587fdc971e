"""Data: corpus sources, tokenizer, embedder and domains (Algorithm 3), shards, sampler (Algorithm 1)."""
