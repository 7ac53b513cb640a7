"""HTTP: one FastAPI app; one module per API dialect, each only translating into the canonical request."""
