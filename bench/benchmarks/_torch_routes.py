"""The best plain-torch routes of the kernels' operations, the comparators a kernel has to beat.

``gram_three_pass`` computes K = G G^T of the softmax Fisher factor G_c = sqrt(p_c) (J_c - m), m = sum_j p_j J_j
(``drift_kernels.reference.fisher_factor``) in three passes, as a careful torch user would:

1. H = [J_c - J_a for every c ; J_a] (B, C + 1, D) with a = argmax p: one elementwise pass over J (read J, write H);
2. M = H H^T (B, C + 1, C + 1) by one ``bmm`` in J's precision promoted to float32 (read H);
3. K = diag(s) A M A^T diag(s) in float64 on the (C + 1)-sized matrices, with s = sqrt(p) and
   A = [I - 1 p^T | delta 1] (C x (C + 1)), delta = 1 - sum_j p_j.

Step 3 is exact algebra: J_c - m = (J_c - J_a) - sum_j p_j (J_j - J_a) + delta J_a, so G = diag(s) A H. As in the
kernel, nothing is centred on the mean m directly, so a nearly one-hot p does not cancel |J| against itself.
It reads J once and H once (2 + 1 passes of C x D values; the kernel reads J once). ``gram_compiled`` is the
same function under ``torch.compile``.
"""

from __future__ import annotations

import functools
from typing import Any

from ._support import need


def gram_three_pass(J: Any, p: Any) -> Any:
    """K (B, C, C) float32 of the softmax Fisher factor by the three passes of the module docstring.

    Args:
        J: (B, C, D) Jacobian, float32 / float16 / bfloat16 (float64 computes in float64).
        p: (B, C) softmax probabilities.
    """
    torch = need("torch")
    B, C, _ = J.shape
    dt = torch.promote_types(J.dtype, torch.float32)
    a = p.argmax(dim=1)
    j_a = J[torch.arange(B, device=J.device), a].to(dt)  # (B, D)
    H = torch.cat([J.to(dt) - j_a[:, None, :], j_a[:, None, :]], dim=1)  # pass 1
    M = torch.bmm(H, H.transpose(1, 2)).double()  # pass 2
    p64 = p.double()
    delta = 1 - p64.sum(dim=1)
    eye = torch.eye(C, dtype=torch.float64, device=J.device).expand(B, C, C)
    A = torch.cat([eye - p64[:, None, :], delta[:, None, None].expand(B, C, 1)], dim=2)  # (B, C, C + 1)
    s = p64.sqrt()
    K = s[:, :, None] * (A @ M @ A.transpose(1, 2)) * s[:, None, :]  # pass 3
    return K.to(torch.float64 if dt == torch.float64 else torch.float32)


@functools.cache
def gram_compiled() -> Any:
    """``torch.compile(gram_three_pass)`` (made once; compiled on the first call for each shape)."""
    return need("torch").compile(gram_three_pass, dynamic=False)
