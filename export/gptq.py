"""Error-compensated int4 rounding (GPTQ: Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", Algorithm 1 with lazy batch updates and
groups), in numpy.

A linear layer y = x @ W^T (W is (N out, K in)) quantized to Q changes its output on calibration
inputs X (T, K) by (W - Q) X^T; GPTQ minimises sum ||(W - Q) X^T||^2 = tr((W - Q) H (W - Q)^T)
with H = X^T X, one input column at a time: column j is rounded, and its rounding error, scaled
by the inverse Hessian's Cholesky factor, is pushed onto the columns not yet rounded. The block
parameters (scale, zero point: MatMulNBits's w = s (q - z)) of each block of `block_size` columns
are fitted when its first column is reached, on the columns as the earlier errors left them, with
the same weighted search as without calibration (export/quantize.py, `_fit_asymmetric`).
"""

from __future__ import annotations

import numpy as np

LAZY_COLUMNS = 128  # columns updated together (GPTQ's lazy batch)
DAMP = 0.01  # added to H's diagonal: DAMP * mean(diag(H)), GPTQ's default percdamp
ACT_ORDER = False  # True: the inputs with the most energy first (measured worse, quantize_gptq)


def inverse_cholesky(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U), (K, K) float64, after damping H's
    diagonal by DAMP * its mean; GPTQ's `Hinv`. Raises numpy.linalg.LinAlgError when H is not
    positive definite even after damping."""
    h = np.array(hessian, np.float64)
    h[np.diag_indices_from(h)] += DAMP * np.mean(np.diag(h))
    inverse = np.linalg.inv(np.linalg.cholesky(h))  # L^-1, H = L L^T
    return np.linalg.cholesky(inverse.T @ inverse).T  # H^-1 = L^-T L^-1 = U^T U


def quantize_gptq(
    w: np.ndarray, hessian: np.ndarray, block_size: int, act_order: bool = ACT_ORDER
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, K) float weight and its inputs' Hessian (K, K) -> asymmetric int4 codes (N, K) uint8
    0..15, scales (N, K / block_size) float32 and zero points (N, K / block_size) uint8, so
    that w ~ scales * (codes - zeros) blockwise; K must be a multiple of block_size (pad first).
    Inputs that never fire (a zero diagonal in H) have their weights zeroed, as in GPTQ.

    act_order: columns are rounded in order of decreasing H diagonal (the inputs with the most
    energy first, GPTQ's `act_order`), with every block's scale and zero point fitted on the
    original weights beforehand (`static_groups`: the blocks stay contiguous, as MatMulNBits
    needs). Otherwise in column order, each block fitted when its first column is reached."""
    from export.quantize import _fit_asymmetric

    n, k = w.shape
    weight = np.array(w, np.float32)
    h = np.array(hessian, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    blocks = k // block_size
    scales = np.empty((n, blocks), np.float32)
    zeros = np.empty((n, blocks), np.uint8)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    if act_order:
        for block in range(blocks):
            columns = slice(block * block_size, (block + 1) * block_size)
            scales[:, block], zeros[:, block], _ = _fit_asymmetric(weight[:, columns], True)
    weight, hinv = weight[:, order], inverse_cholesky(h[order][:, order]).astype(np.float32)
    codes = np.empty((n, k), np.uint8)
    lazy = max(LAZY_COLUMNS, block_size)
    for start in range(0, k, lazy):
        end = min(k, start + lazy)
        part = weight[:, start:end]  # a view: updated in place
        errors = np.empty_like(part)
        for j in range(end - start):
            column = start + j
            block = order[column] // block_size
            if not act_order and column % block_size == 0:
                fit = _fit_asymmetric(part[:, j : j + block_size], True)
                scales[:, block], zeros[:, block] = fit[0], fit[1]
            s, z = scales[:, block], zeros[:, block]
            q = np.clip(np.rint(part[:, j] / s + z), 0, 15)
            codes[:, order[column]] = q
            error = (part[:, j] - s * (q - z)) / hinv[column, column]
            part[:, j:] -= np.outer(error, hinv[column, column:end])
            errors[:, j] = error
        weight[:, end:] -= errors @ hinv[start:end, end:]
    return codes, scales, zeros


def output_error(w: np.ndarray, q: np.ndarray, hessian: np.ndarray) -> float:
    """tr((W - Q) H (W - Q)^T): the summed squared change of the layer's outputs over the
    calibration inputs whose Hessian is H; (N, K) weights, (K, K) Hessian."""
    delta = (np.asarray(w, np.float64) - q).astype(np.float64)
    return float(np.sum((delta @ hessian) * delta))
