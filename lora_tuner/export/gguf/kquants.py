"""llama.cpp's k-quant blocks (Q4_K, Q5_K, Q6_K: 256 values each), chosen exactly as its reference quantizer chooses
them (ggml-quants.c, quantize_row_q{4,5,6}_K_ref: what llama-quantize runs without an importance matrix), vectorised
over many blocks in numpy. Written here because the `gguf` package reads k-quants but does not write them
(gguf.quants.quantize raises NotImplementedError for them) and no installed library does.

Q6_K: 16 sub-blocks of 16 values, each with an int8 scale (make_qx_quants: of 19 candidate scales, the one with the
least x^2-weighted error), 6-bit values, one fp16 block scale. Q4_K and Q5_K: 8 sub-blocks of 32 values, each with a
scale and a min (make_qkx2_quants: least-squares fits on 21 or 16 candidate grids, weighted by |x| + rms(x)), stored as
6-bit numbers under two fp16 block scales, and 4- or 5-bit values.

The choice between candidates turns on float32 sums, so they are taken as llama.cpp takes them: in float32, one value
after another. Arrays are laid out [position in the sub-block, sub-block], so that numpy's sum over axis 0 adds whole
rows in that order while the arithmetic runs across sub-blocks (summing along the contiguous axis would be pairwise,
and other candidates would win near-ties)."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
BLOCKS_PER_PASS = 1024  # ~1 MB arrays: they stay in the core's cache through a block's ~400 passes
BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
f32 = np.float32


def quantize(values: np.ndarray, kind: str, threads: int = 2) -> np.ndarray:
    """float32 rows whose length is a multiple of 256 -> uint8 rows of `kind` blocks as llama.cpp lays them out.
    Passes of BLOCKS_PER_PASS blocks run on `threads` threads (numpy releases the GIL in its loops)."""
    blocks = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, QK_K)
    encode = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[kind]
    passes = [blocks[i:i + BLOCKS_PER_PASS] for i in range(0, len(blocks), BLOCKS_PER_PASS)]
    with ThreadPoolExecutor(threads) as pool:
        out = np.concatenate(list(pool.map(encode, passes)))
    return out.reshape(*values.shape[:-1], values.shape[-1] // QK_K * BYTES[kind])


def _first_largest(x: np.ndarray) -> np.ndarray:
    """Per column, the value of largest magnitude, the first one on ties (llama.cpp keeps it with a strict '>')."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=0)[None], axis=0)[0]


# Q6_K
def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1) for each column of x [16, m]: (scale [m], L [16, m] = nmax + level). The levels
    are computed once, at the end, from the winning candidate's inverse scale (a per-candidate np.where over them
    cost as much as everything else)."""
    peak = _first_largest(x)
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, f32(1), peak)
    weight = x * x
    wx = weight * x

    def levels(iscale):
        return np.clip(np.rint(np.multiply(iscale, x)), -nmax, nmax - 1)

    def fit(iscale):
        level = levels(iscale)
        return (wx * level).sum(axis=0), (weight * level * level).sum(axis=0)

    chosen = f32(-nmax) / peak
    sumlx, suml2 = fit(chosen)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / peak
        c_sumlx, c_suml2 = fit(iscale)
        better = (c_suml2 > 0) & (c_sumlx * c_sumlx > best * c_suml2)
        chosen = np.where(better, iscale, chosen)
        scale = np.where(better, c_sumlx / np.where(better, c_suml2, f32(1)), scale)
        best = np.where(better, scale * c_sumlx, best)
    level = levels(chosen) + nmax
    level[:, zero] = 0
    return np.where(zero, f32(0), scale), level.astype(np.uint8)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    sub = np.ascontiguousarray(blocks.reshape(n * 16, 16).T)
    scales, levels = _make_qx_quants(sub, 32)
    scales, levels = scales.reshape(n, 16), levels.T.reshape(n, QK_K)
    top = _first_largest(scales.T)
    empty = np.abs(top) < GROUP_MAX_EPS
    iscale = f32(-128) / np.where(empty, f32(1), top)
    d = (f32(1) / iscale).astype(np.float16)
    sub_scales = np.minimum(127, np.rint(iscale[:, None] * scales))  # in [-128, 127]
    step = np.repeat(d.astype(np.float32)[:, None] * sub_scales, 16, axis=1)
    fresh = np.clip(np.rint(blocks / np.where(step == 0, f32(1), step)), -32, 31) + 32
    levels = np.where(step != 0, fresh.astype(np.uint8), levels)  # a zero sub-block scale keeps make_qx's levels
    q = levels.reshape(n, 2, 4, 32)  # per half of 128 values: four runs of 32
    low, high = q & 0xF, q >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sub_scales.astype(np.int8).view(np.uint8),
                          d.view(np.uint8).reshape(n, 2)], axis=1)
    out[empty] = 0  # an all-zero block is all zero bytes
    return out


# Q4_K and Q5_K
def _make_qkx2_quants(x: np.ndarray, weight: np.ndarray, nmax: int, rmin: float, nstep: int):
    """make_qkx2_quants (rdelta 0.1, use_mad false) for each column of x [32, m]: (scale, the_min, L). The min found
    so far moves the next candidates' grid, as in llama.cpp's loop; the levels are computed once, at the end, from
    the winning grid. Work arrays are reused (a fresh 1 MB array per operation costs its page faults each time)."""
    low = np.minimum(x.min(axis=0), f32(0))
    high = x.max(axis=0)
    flat = high == low
    sum_w, sum_x = weight.sum(axis=0), (weight * x).sum(axis=0)
    level, work = np.empty_like(x), np.empty_like(x)

    def levels(iscale, low, out):
        np.subtract(x, low, out=out)
        np.multiply(iscale, out, out=out)
        np.rint(out, out=out)
        return np.clip(out, f32(0), f32(nmax), out=out)

    def error(level, scale, low):
        np.multiply(scale, level, out=work)
        np.add(work, low, out=work)
        np.subtract(work, x, out=work)
        np.multiply(work, work, out=work)
        np.multiply(work, weight, out=work)
        return work.sum(axis=0)

    iscale = f32(nmax) / np.where(flat, f32(1), high - low)
    scale = f32(1) / iscale
    grid = (iscale, low)  # the winning candidate's inverse scale and the min its levels were computed from
    best = error(levels(iscale, low, level), scale, low)
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(0.1) * f32(step) + f32(nmax)) / np.where(flat, f32(1), high - low)
        candidate = levels(iscale, low, level)
        wl = np.multiply(weight, candidate, out=work)
        sum_l = wl.sum(axis=0)
        sum_xl = (wl * x).sum(axis=0)
        sum_l2 = np.multiply(wl, candidate, out=wl).sum(axis=0)
        det = sum_w * sum_l2 - sum_l * sum_l
        solvable = det > 0
        det = np.where(solvable, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = np.where(positive, f32(0), this_min)
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        this_error = error(candidate, this_scale, this_min)
        better = solvable & (this_error < best) & ~flat
        grid = (np.where(better, iscale, grid[0]), np.where(better, low, grid[1]))
        best = np.where(better, this_error, best)
        scale = np.where(better, this_scale, scale)
        low = np.where(better, this_min, low)
    level = levels(*grid, level)
    level[:, flat] = 0
    return np.where(flat, f32(0), scale), -low, level.astype(np.uint8)


def _with_mins(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    """(d and dmin as fp16 bytes [n, 4], the 12 packed 6-bit scale and min bytes, levels [n, 256]) of Q4_K (nmax
    15) or Q5_K (nmax 31)."""
    n = len(blocks)
    sub = np.ascontiguousarray(blocks.reshape(n * 8, 32).T)
    rms = np.sqrt((sub * sub).sum(axis=0) / f32(32))
    scales, mins, levels = _make_qkx2_quants(sub, rms + np.abs(sub), nmax, rmin, nstep)
    scales, mins, levels = scales.reshape(n, 8), mins.reshape(n, 8), levels.T.reshape(n, QK_K)
    top_scale = np.maximum(scales.max(axis=1), f32(0))
    top_min = np.maximum(mins.max(axis=1), f32(0))
    inv_scale = np.where(top_scale > 0, f32(63) / np.where(top_scale > 0, top_scale, f32(1)), f32(0))
    inv_min = np.where(top_min > 0, f32(63) / np.where(top_min > 0, top_min, f32(1)), f32(0))
    # llama.cpp keeps nearest_int's result in a uint8_t (modulo 256) before MIN(63, ...)
    ls = np.minimum(np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63)
    lm = np.minimum(np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63)
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1).astype(np.uint8)
    d, dmin = (top_scale / f32(63)).astype(np.float16), (top_min / f32(63)).astype(np.float16)
    step = np.repeat(d.astype(np.float32)[:, None] * ls.astype(np.float32), 32, axis=1)
    shift = np.repeat(dmin.astype(np.float32)[:, None] * lm.astype(np.float32), 32, axis=1)
    fresh = np.clip(np.rint((blocks + shift) / np.where(step == 0, f32(1), step)), 0, nmax)
    levels = np.where(step != 0, fresh.astype(np.uint8), levels)  # a zero sub-block scale keeps the fit's levels
    head = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2)], axis=1)
    return head, packed, levels


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    head, packed, levels = _with_mins(blocks, 15, -1.0, 20)
    q = levels.reshape(n, 4, 2, 32)  # per 64 values: the first 32 in low nibbles, the next 32 in high nibbles
    return np.concatenate([head, packed, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    head, packed, levels = _with_mins(blocks, 31, -0.5, 15)
    q = levels.reshape(n, 4, 2, 32)
    low, high = q & 0xF, (q >> 4).astype(np.uint8)  # value j of run g: fifth bit at bit 2g (or 2g+1) of qh[j]
    shifts = (np.arange(4, dtype=np.uint8) * 2)[None, :, None]
    qh = np.bitwise_or.reduce((high[:, :, 0] << shifts) | (high[:, :, 1] << (shifts + 1)), axis=1)
    return np.concatenate([head, packed, qh, (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)], axis=1)
