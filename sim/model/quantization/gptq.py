"""GPTQ: group-wise integer weight quantization that compensates each rounding error.

A linear layer `y = x W^T` sees calibration inputs `X [n, k]`. GPTQ quantizes the columns of `W`
(input channels) one at a time, left to right; after rounding column i it spreads that column's
error over the columns not yet quantized, weighted by the inverse Hessian `H^-1` of the layer's
squared output error (`H = X^T X`, damped by 1% of its mean diagonal), so that `||X W^T -
X Q^T||` grows as little as possible (Optimal Brain Quantization one column at a time, with the
Cholesky factor of `H^-1` and lazy block updates of 128 columns). Group scales and zero points are
computed from the (already updated) weights when a group starts, as GPTQ does without
`static_groups`. Everything runs in float64.

References: Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (Algorithm 1); Frantar & Alistarh 2022 (Optimal Brain Compression).
"""

from __future__ import annotations

import numpy as np

from sim.model.quantization.formats import group_size_for, int_codes, int_params

DAMP_FRACTION = 0.01  # GPTQ's default percdamp
BLOCK_SIZE = 128  # columns per lazy batch update


def gptq_quantize(w: np.ndarray, x: np.ndarray, bits: int = 4, group_size: int = 128,
                  symmetric: bool = False) -> np.ndarray:
    """The dequantized GPTQ weights (float64, shape of `w [m, k]`) for calibration inputs
    `x [n, k]`."""
    # work on the transpose [k, m]: column i of W is the contiguous row i
    wt = np.array(np.asarray(w, dtype=np.float64).T)  # [k, m] (a working copy, updated)
    x = np.asarray(x, dtype=np.float64).reshape(-1, wt.shape[0])  # [n, k]
    k, m = wt.shape
    g = group_size_for(k, group_size)
    h = x.T @ x  # [k, k]
    dead = np.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    h += DAMP_FRACTION * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # [k, k] upper: H^-1 = U^T U
    qt = np.zeros_like(wt)  # [k, m]
    scale = zero = None
    for b0 in range(0, k, BLOCK_SIZE):
        b1 = min(b0 + BLOCK_SIZE, k)
        err = np.zeros((b1 - b0, m))  # [block, m]
        for i in range(b0, b1):
            if i % g == 0:
                scale, zero = int_params(wt[i: i + g].T, bits, symmetric)  # [m] each
            assert scale is not None
            codes = int_codes(wt[i], scale, zero, bits)  # [m]
            qi = (codes - (0.0 if zero is None else zero)) * scale  # [m]
            qt[i] = qi
            e = (wt[i] - qi) / u[i, i]  # [m]
            wt[i + 1: b1] -= u[i, i + 1: b1, None] * e[None, :]  # [b1 - i - 1, m]
            err[i - b0] = e
        wt[b1:] -= u[b0:b1, b1:].T @ err  # [k - b1, m]
    return qt.T  # [m, k]
