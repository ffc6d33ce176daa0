"""k-quant blocks, block by block: the bytes lora-tune writes, read by `gguf`'s own dequantizer, are the values they
were meant to hold, and no block reconstructs its 256 values worse than llama.cpp's reference quantizer
(ggml-quants.c, quantize_row_q{4,5,6}_K_ref), written out below as plain loops over a few blocks."""
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from lora_tuner.export.gguf.kquants import quantize

f32 = np.float32


def nearest_int(value) -> int:
    return int(np.rint(f32(value)))


def fp16(value) -> np.float32:
    return f32(np.float16(value))


def make_qx_quants(x, nmax):
    """llama.cpp's make_qx_quants with rmse_type 1 (weights x^2): the scale of one sub-block."""
    amax, peak = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, peak = abs(v), v
    if amax < 1e-15:
        return f32(0), [0] * len(x)

    def fit(iscale):
        levels = [max(-nmax, min(nmax - 1, nearest_int(iscale * v))) for v in x]
        sumlx = sum(f32(v * v * v * l) for v, l in zip(x, levels))
        suml2 = sum(f32(v * v * l * l) for v, l in zip(x, levels))
        return levels, f32(sumlx), f32(suml2)

    levels, sumlx, suml2 = fit(f32(-nmax) / peak)
    scale = sumlx / suml2 if suml2 else f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        candidate, c_sumlx, c_suml2 = fit(-(f32(nmax) + f32(0.1) * step) / peak)
        if c_suml2 > 0 and c_sumlx * c_sumlx > best * c_suml2:
            levels, scale = candidate, c_sumlx / c_suml2
            best = scale * c_sumlx
    return scale, [level + nmax for level in levels]


def reference_q6_k(block):
    """quantize_row_q6_K_ref for one block, dequantized: the values llama.cpp's own quantizer would store."""
    scales, levels = [], []
    for sub in range(16):
        scale, sub_levels = make_qx_quants(block[16 * sub:16 * sub + 16], 32)
        scales.append(scale)
        levels += sub_levels
    top = max(scales, key=abs)  # the first largest
    if abs(top) < 1e-15:
        return np.zeros(256, f32)
    iscale = f32(-128) / top
    d = fp16(f32(1) / iscale)
    out = np.zeros(256, f32)
    for sub in range(16):
        step = d * f32(min(127, nearest_int(iscale * scales[sub])))
        for i in range(16):
            level = levels[16 * sub + i] - 32 if step == 0 else max(-32, min(31, nearest_int(block[16 * sub + i] / step)))
            out[16 * sub + i] = step * level
    return out


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep):
    """llama.cpp's make_qkx2_quants (use_mad false): (scale, the_min, levels) of one sub-block."""
    low, high = min(min(x), f32(0)), max(x)
    if high == low:
        return f32(0), -low, [0] * len(x)
    sum_w, sum_x = f32(sum(weights)), f32(sum(w * v for w, v in zip(weights, x)))

    def error(levels, scale, low):
        return sum(w * (scale * l + low - v) ** 2 for w, l, v in zip(weights, levels, x))

    iscale = f32(nmax) / (high - low)
    scale = f32(1) / iscale
    levels = [max(0, min(nmax, nearest_int(iscale * (v - low)))) for v in x]
    best = error(levels, scale, low)
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * step + nmax) / (high - low)
        candidate = [max(0, min(nmax, nearest_int(iscale * (v - low)))) for v in x]
        sum_l = f32(sum(w * l for w, l in zip(weights, candidate)))
        sum_l2 = f32(sum(w * l * l for w, l in zip(weights, candidate)))
        sum_xl = f32(sum(w * l * v for w, l, v in zip(weights, candidate, x)))
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min, this_scale = f32(0), sum_xl / sum_l2
            this_error = error(candidate, this_scale, this_min)
            if this_error < best:
                levels, best, scale, low = candidate, this_error, this_scale, this_min
    return scale, -low, levels


def reference_k_with_mins(block, nmax, rmin, nstep):
    """quantize_row_q4_K_ref (nmax 15) / quantize_row_q5_K_ref (nmax 31) for one block, dequantized."""
    scales, mins, levels = [], [], []
    for sub in range(8):
        x = block[32 * sub:32 * sub + 32]
        rms = f32(math.sqrt(f32(sum(v * v for v in x)) / 32))
        scale, the_min, sub_levels = make_qkx2_quants(x, [rms + abs(v) for v in x], nmax, rmin, 0.1, nstep)
        scales.append(scale)
        mins.append(the_min)
        levels += sub_levels
    top_scale, top_min = max([f32(0)] + scales), max([f32(0)] + mins)
    inv_scale = f32(63) / top_scale if top_scale > 0 else f32(0)
    inv_min = f32(63) / top_min if top_min > 0 else f32(0)
    d, dmin = fp16(top_scale / f32(63)), fp16(top_min / f32(63))
    out = np.zeros(256, f32)
    for sub in range(8):
        ls = min(63, nearest_int(inv_scale * scales[sub]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[sub]) & 0xFF)
        step, shift = d * f32(ls), dmin * f32(lm)
        for i in range(32):
            v = block[32 * sub + i]
            level = levels[32 * sub + i] if step == 0 else max(0, min(nmax, nearest_int((v + shift) / step)))
            out[32 * sub + i] = step * level - shift
    return out


REFERENCES = {
    "Q6_K": reference_q6_k,
    "Q4_K": lambda block: reference_k_with_mins(block, 15, -1.0, 20),
    "Q5_K": lambda block: reference_k_with_mins(block, 31, -0.5, 15),
}


def blocks(seed: int) -> np.ndarray:
    """Weight-like blocks: Gaussian, heavy-tailed, one-signed, with an outlier, nearly constant, and all zero."""
    rng = np.random.default_rng(seed)
    rows = [rng.normal(0, 0.02, 256), rng.standard_t(3, 256) * 0.01, np.abs(rng.normal(0, 1, 256)),
            np.where(np.arange(256) == 7, 0.5, rng.normal(0, 0.01, 256)), 0.3 + rng.normal(0, 1e-4, 256),
            np.zeros(256)]
    return np.stack(rows).astype(f32)


@pytest.mark.parametrize("kind", list(REFERENCES))
def test_each_block_holds_what_llama_cpps_reference_quantizer_would(kind):
    data = blocks(seed=0)
    written = quantize(data, kind)
    assert written.dtype == np.uint8 and written.shape == (len(data), {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[kind])
    read = quants.dequantize(written, getattr(GGMLQuantizationType, kind))  # gguf's reader, not our code
    for row, block in enumerate(data):
        reference = REFERENCES[kind](block)
        ours, theirs = float(np.sum((read[row] - block) ** 2)), float(np.sum((reference - block) ** 2))
        assert ours <= theirs * (1 + 1e-4) + 1e-12, (kind, row, ours, theirs)
    assert not np.any(read[-1])  # an all-zero block stays zero


def test_a_tensor_quantizes_as_its_blocks_do():
    """Rows of many blocks, quantized in passes: each block as it would be on its own."""
    data = np.random.default_rng(1).normal(0, 0.02, (6, 1024)).astype(f32)
    for kind in REFERENCES:
        whole = quantize(data, kind)
        alone = np.concatenate([quantize(block[None], kind) for block in data.reshape(-1, 256)])
        assert np.array_equal(whole.reshape(len(alone), -1), alone)


def test_more_bits_reconstruct_weight_like_values_better():
    """On heavy-tailed values, as trained weights are: Q6_K < Q5_K < Q4_K < gguf's own Q4_0 in relative error (SmolLM2's
    weights, read from a Q4_1 file, sit on a grid Q4_K happens to fit, which reverses Q4_K and Q5_K there)."""
    data = np.random.default_rng(2).standard_t(5, (64, 1024)).astype(f32) * 0.02

    def error(kind):
        written = quantize(data, kind) if kind.endswith("_K") else quants.quantize(data, GGMLQuantizationType.Q4_0)
        read = quants.dequantize(written, getattr(GGMLQuantizationType, kind))
        return float(np.sqrt(np.mean((read - data) ** 2) / np.mean(data ** 2)))

    errors = [error(kind) for kind in ("Q6_K", "Q5_K", "Q4_K", "Q4_0")]
    assert errors == sorted(errors) and errors[0] < 0.03, errors
