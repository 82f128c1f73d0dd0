"""The CM3 decoder, the causal-masked objective, training and generation."""
