"""The ``otmel`` command line: a thin parser (``main.py``) and one module per command group, each
command's body a call into the library or a job. The one place outside jobs/ that runs jobs."""
