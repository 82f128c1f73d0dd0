"""The orchestrator: the ``cm3`` command line, Ray connection and the embedded demo."""
