"""Ray entrypoints (installed as ``otmel.jobs``)."""
