"""REST recommendation service (FastAPI + faiss) over the platform's model bundles."""
