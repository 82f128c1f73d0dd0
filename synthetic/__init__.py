"""The demo's synthetic data set: captioned shapes, their pixel checker, a loopback server and the SFT demo tasks.

Its own layer (above the data pipeline, below index and model) because the demo, the SFT demo tasks, the tests and
the benchmarks all use it; inside ``workflows/`` it would make every one of them import from the top floor."""
