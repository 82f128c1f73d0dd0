"""Ingest: URL-list readers, the img2dataset download on Ray, raw shards and their stats."""
