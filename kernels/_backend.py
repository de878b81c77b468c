"""Backend selection shared by every operator."""

BACKENDS = ("auto", "reference", "torch")


def resolve_backend(backend: str) -> str:
    """Map ``auto`` to the fastest available backend; reject unknown names with the list of valid ones."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return "torch" if backend == "auto" else backend
