"""Plain-PyTorch references the library's kernels are checked against."""

from torch import Tensor


def dense_decode(acts: Tensor, indices: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Decode through a dense N x M matrix: what `kernels.sparse_decode` must equal."""
    dense = acts.new_zeros(acts.shape[0], weight.shape[0]).scatter_add(1, indices, acts)
    out = dense @ weight
    return out + bias if bias is not None else out
