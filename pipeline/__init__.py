"""Data: ingest (URL lists, the img2dataset download on Ray, raw shards), the tokenize stage, SFT task formats."""
