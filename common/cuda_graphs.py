"""``--cuda-graphs``: the batch sizes whose decode steps the paged backend captures as CUDA graphs."""

from __future__ import annotations


def parse_cuda_graphs(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)`` (sorted, each once); ``"0"`` -> ``()``, no graphs (TGI's meaning).
    Raises ValueError naming the flag for anything else."""
    try:
        sizes = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(
            f"`cuda_graphs` must be comma-separated batch sizes, or 0. Given: {text!r}"
        ) from None
    if sizes == {0}:
        return ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"`cuda_graphs` batch sizes must be positive (0 alone disables). Given: {text!r}")
    return tuple(sorted(sizes))
