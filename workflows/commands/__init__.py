"""The functions behind each `cm3` command; `cm3.workflows.cli` registers them with typer."""
