"""The demo's synthetic data set: captioned shapes, their pixel checker, a loopback server and the SFT demo tasks.

Its own layer (above the data pipeline, below index and model) because the demo, the SFT demo tasks, the tests and
the benchmarks all use it; inside ``workflows/`` it would make every one of them import from the top floor."""

from cm3.core.exports import lazy_exports

_EXPORTS = {  # public name -> the module that defines it
    "ShapeSpec": "shapes", "spec_for": "shapes", "iter_dataset": "shapes", "render": "shapes",
    "read_attributes": "checker", "score": "checker", "DemoDataServer": "server",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
