"""Plumbing every layer uses: storage (local paths and ``s3://``), integrity (checksums), worker
memory, safe image decoding (bytes in, a bounded image out). Imports nothing else from otmel."""
