"""Where generated images live: a local directory (default) or S3-compatible object storage."""
