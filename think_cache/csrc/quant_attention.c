/* Decode attention over a quantized compact part on the CPU: the two loops of think_cache.cpu_kernels.
 *
 * What think_cache.quant.quantized_attention_logits / quantized_attention_output compute, for the few query rows
 * of a decoding step, reading each token's packed codes once and never writing a dequantized copy of the context:
 * a tile of `TILE` tokens is unpacked into 8-lane float vectors (a few KiB, in the L1 cache) and used at once.
 *
 * Layouts are those of think_cache.quant: token-major rows of `width` packed bytes, planar packing (byte j of a row
 * holds channel j + i * width in bits [i * bits, (i + 1) * bits)); every array is contiguous, batch and KV head
 * flattened into `heads`. Scales and zero points are read as stored (float32, bfloat16 or float16: `*_kind`),
 * scales also as one-byte codes decoded through `scale_table` (256 float32s); the arithmetic is float32.
 *
 * Lanes: plane i of a row unpacks into `vecs` 8-lane vectors (`vecs = ceil(width / 8)`), so lane i * 8 * vecs + j
 * holds channel i * width + j (for j < width and that channel < channels; every other lane is padding: its code is
 * 0, and its query, scale, zero point and output are 0 or unused). Written with the GCC / Clang vector extensions
 * (8 floats are one AVX register, two SSE or NEON ones elsewhere), AVX intrinsics only where they pay (widening
 * bytes, summing eight vectors' lanes at once), each with a plain fallback.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#define INLINE static inline __attribute__((always_inline))
/* Tokens unpacked at a time: a tile of TILE x lanes float32s (8 KiB for 64 lanes). */
#define TILE 32

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

/* The layout of one row: code width, codes per byte, packed bytes, vectors per plane, lanes. */
typedef struct {
    int bits, per;
    int64_t width, vecs, lanes;
} row_layout;

INLINE row_layout layout_of(int bits, int64_t width) {
    row_layout l = {bits, 8 / bits, width, (width + 7) / 8, 0};
    l.lanes = (int64_t)l.per * l.vecs * 8;
    return l;
}

/* The channel of every lane, -1 for padding. */
static void lane_channels(const row_layout *l, int64_t channels, int64_t *channel) {
    for (int i = 0; i < l->per; ++i)
        for (int64_t j = 0; j < l->vecs * 8; ++j) {
            const int64_t c = i * l->width + j;
            channel[i * l->vecs * 8 + j] = j < l->width && c < channels ? c : -1;
        }
}

/* Eight bytes widened to eight int32 lanes. */
INLINE v8i load_bytes(const uint8_t *p) {
#ifdef __AVX2__
    return (v8i)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    v8i x;
    for (int j = 0; j < 8; ++j) x[j] = p[j];
    return x;
#endif
}

/* One row dequantized: lane vector v is its codes times scale[v] plus zero[v]; `per * vecs` vectors. `pad` holds
 * vecs * 8 bytes, zero past `width`. */
INLINE void dequantize_row(const row_layout l, const uint8_t *row, uint8_t *pad, const v8f *scale, const v8f *zero,
                           v8f *out) {
    const uint8_t *bytes = row;
    if (l.width % 8 && l.width > 0) { /* a partial vector: read from a zero-padded copy, not past the row */
        memcpy(pad, row, (size_t)l.width);
        bytes = pad;
    }
    const int32_t mask = (1 << l.bits) - 1;
    for (int64_t k = 0; k < l.vecs; ++k) {
        const v8i x = load_bytes(bytes + 8 * k);
        for (int i = 0; i < l.per; ++i) {
            const int64_t v = i * l.vecs + k;
            out[v] = __builtin_convertvector((x >> (i * l.bits)) & mask, v8f) * scale[v] + zero[v];
        }
    }
}

/* How scales and zero points are stored: float32, bfloat16, float16, or (scales only) one-byte codes. */
enum { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2, SCALE_CODES = 3 };

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float f;
    if (exponent == 0x1f) { /* inf, nan */
        const uint32_t u = sign | 0x7f800000u | (mantissa << 13);
        memcpy(&f, &u, 4);
        return f;
    }
    if (exponent == 0) { /* zero, subnormal: mantissa * 2**-24 exactly */
        f = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    const uint32_t u = sign | ((exponent + 112) << 23) | (mantissa << 13);
    memcpy(&f, &u, 4);
    return f;
}

/* Element i of a stored float array of the given kind (for SCALE_CODES: its code's scale in `table`). */
INLINE float load_at(const void *p, int kind, const float *table, int64_t i) {
    switch (kind) {
        case BFLOAT16: {
            const uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
            float f;
            memcpy(&f, &u, 4);
            return f;
        }
        case FLOAT16: return half_to_float(((const uint16_t *)p)[i]);
        case SCALE_CODES: return table[((const uint8_t *)p)[i]];
        default: return ((const float *)p)[i];
    }
}

/* The lane sums of eight vectors: out[j] = sum of x[j]'s lanes. */
INLINE void lane_sums8(const v8f *x, float *out) {
#ifdef __AVX__
    const __m256 t0 = _mm256_hadd_ps((__m256)x[0], (__m256)x[1]), t1 = _mm256_hadd_ps((__m256)x[2], (__m256)x[3]);
    const __m256 t2 = _mm256_hadd_ps((__m256)x[4], (__m256)x[5]), t3 = _mm256_hadd_ps((__m256)x[6], (__m256)x[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
    for (int j = 0; j < 8; ++j)
        out[j] = ((x[j][0] + x[j][4]) + (x[j][1] + x[j][5])) + ((x[j][2] + x[j][6]) + (x[j][3] + x[j][7]));
#endif
}

/* out[r * stride + t] = q[r] . tile[t] for the tile's n tokens. */
INLINE void tile_logits(const v8f *q, const v8f *tile, int64_t nv, int64_t rows, int64_t n, float *out,
                        int64_t stride) {
    for (int64_t r = 0; r < rows; ++r) {
        const v8f *qr = q + r * nv;
        int64_t t = 0;
        for (; t + 8 <= n; t += 8) { /* eight tokens' products, their lanes summed together */
            v8f s[8];
            for (int j = 0; j < 8; ++j) {
                const v8f *k = tile + (t + j) * nv;
                s[j] = qr[0] * k[0];
                for (int64_t v = 1; v < nv; ++v) s[j] += qr[v] * k[v];
            }
            lane_sums8(s, out + r * stride + t);
        }
        for (; t < n; ++t) {
            const v8f *k = tile + t * nv;
            v8f s[8] = {qr[0] * k[0]};
            for (int64_t v = 1; v < nv; ++v) s[0] += qr[v] * k[v];
            float sums[8];
            lane_sums8(s, sums);
            out[r * stride + t] = sums[0];
        }
    }
}

/* acc[r] += sum_t w[r * stride + t] * tile[t] for `m` (1 to 4, a constant where inlined) rows, their sums in
 * registers, each split over even and odd tokens. */
INLINE void rows_accumulate(const float *w, int64_t stride, const v8f *tile, int64_t nv, int m, int64_t n,
                            v8f *acc) {
    /* rows past m are never read: their pointers repeat row 0's, so none points past the weights */
    const float *w0 = w, *w1 = m > 1 ? w + stride : w, *w2 = m > 2 ? w + 2 * stride : w, *w3 = m > 3 ? w + 3 * stride : w;
    for (int64_t v = 0; v < nv; ++v) {
        v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        int64_t t = 0;
        for (; t + 2 <= n; t += 2) {
            const v8f x = tile[t * nv + v], y = tile[(t + 1) * nv + v];
            a0 += w0[t] * x, b0 += w0[t + 1] * y;
            if (m > 1) a1 += w1[t] * x, b1 += w1[t + 1] * y;
            if (m > 2) a2 += w2[t] * x, b2 += w2[t + 1] * y;
            if (m > 3) a3 += w3[t] * x, b3 += w3[t + 1] * y;
        }
        if (t < n) {
            const v8f x = tile[t * nv + v];
            a0 += w0[t] * x;
            if (m > 1) a1 += w1[t] * x;
            if (m > 2) a2 += w2[t] * x;
            if (m > 3) a3 += w3[t] * x;
        }
        acc[v] += a0 + b0;
        if (m > 1) acc[nv + v] += a1 + b1;
        if (m > 2) acc[2 * nv + v] += a2 + b2;
        if (m > 3) acc[3 * nv + v] += a3 + b3;
    }
}

INLINE void tile_accumulate(const float *w, int64_t stride, const v8f *tile, int64_t nv, int64_t rows, int64_t n,
                            v8f *acc) {
    for (int64_t r = 0; r < rows; r += 4) {
        const float *wr = w + r * stride;
        v8f *ar = acc + r * nv;
        switch (rows - r < 4 ? rows - r : 4) {
            case 1: rows_accumulate(wr, stride, tile, nv, 1, n, ar); break;
            case 2: rows_accumulate(wr, stride, tile, nv, 2, n, ar); break;
            case 3: rows_accumulate(wr, stride, tile, nv, 3, n, ar); break;
            default: rows_accumulate(wr, stride, tile, nv, 4, n, ar); break;
        }
    }
}

/* ------------------------------------------------------------------------------------------------------- keys */
INLINE int keys_logits(const float *query, const uint8_t *codes, const void *scale, int scale_kind,
                       const float *scale_table, const void *zero, int zero_kind, const int32_t *block_index, int64_t heads,
                       int64_t rows, int64_t tokens, int64_t channels, int64_t width, const int bits, int64_t block,
                       int64_t blocks, float scaling, float *out) {
    const row_layout l = layout_of(bits, width);
    const int64_t nv = l.lanes / 8;
    v8f *work = aligned_alloc(32, sizeof(v8f) * (size_t)(nv * (rows + TILE + 2) + 1)); /* + 1: never 0 bytes */
    int64_t *channel = malloc(sizeof(int64_t) * (size_t)(l.lanes + 1));
    uint8_t *pad = calloc((size_t)(l.vecs * 8 + 1), 1);
    if (!work || !channel || !pad) {
        free(work), free(channel), free(pad);
        return 1;
    }
    v8f *q = work, *tile = q + nv * rows, *s = tile + nv * TILE, *z = s + nv;
    lane_channels(&l, channels, channel);
    if (nv == 0) /* no channels: every logit is 0 */
        memset(out, 0, sizeof(float) * (size_t)(heads * rows * tokens));
    for (int64_t h = 0; h < heads && nv > 0; ++h) {
        const uint8_t *hc = codes + h * tokens * width;
        const int64_t sz = h * blocks * channels;
        const int32_t *bi = block_index ? block_index + h * tokens : NULL;
        float *o = out + h * rows * tokens;
        for (int64_t r = 0; r < rows; ++r) {
            float lanes[8];
            for (int64_t v = 0; v < nv; ++v) {
                for (int j = 0; j < 8; ++j) {
                    const int64_t c = channel[v * 8 + j];
                    lanes[j] = c < 0 ? 0.0f : query[(h * rows + r) * channels + c] * scaling;
                }
                memcpy(q + r * nv + v, lanes, sizeof lanes);
            }
        }
        int64_t current = -1, k = -1, next = 0;
        for (int64_t start = 0; start < tokens; start += TILE) {
            const int64_t n = tokens - start < TILE ? tokens - start : TILE;
            for (int64_t i = 0; i < n; ++i) {
                const int64_t t = start + i;
                if (bi) {
                    k = bi[t];
                } else if (t == next) { /* regular blocks: the next one starts */
                    ++k;
                    next += block;
                }
                if (k != current) { /* its scales and zero points into lanes */
                    if ((uint64_t)k >= (uint64_t)blocks) { /* a block index out of range: refuse, never read past */
                        free(work), free(channel), free(pad);
                        return 3;
                    }
                    current = k;
                    const int64_t at = sz + k * channels;
                    for (int64_t v = 0; v < nv; ++v) {
                        float sl[8], zl[8];
                        for (int j = 0; j < 8; ++j) {
                            const int64_t c = channel[v * 8 + j];
                            sl[j] = c < 0 ? 0.0f : load_at(scale, scale_kind, scale_table, at + c);
                            zl[j] = c < 0 ? 0.0f : load_at(zero, zero_kind, NULL, at + c);
                        }
                        memcpy(s + v, sl, sizeof sl);
                        memcpy(z + v, zl, sizeof zl);
                    }
                }
                dequantize_row(l, hc + t * width, pad, s, z, tile + i * nv);
            }
            tile_logits(q, tile, nv, rows, n, o + start, tokens);
        }
    }
    free(work), free(channel), free(pad);
    return 0;
}

/* logits[h, r, t] = scaling * sum_c query[h, r, c] * (code[h, t, c] * scale[h, k, c] + zero[h, k, c]),
 * k = block_index[h, t] when given, else t / block.
 *
 * query (heads, rows, channels); codes (heads, tokens, width); scale and zero (heads, blocks, channels), of
 * `scale_kind` / `zero_kind`; block_index (heads, tokens) or NULL; out (heads, rows, tokens).
 * A tile of tokens is dequantized into lane vectors (a block's scales and zero points gathered into lanes once per
 * block), then every query row takes its dot products with them, eight tokens' lane sums at once.
 * Returns 0, 1 when a work buffer could not be allocated, 2 for bits other than 2, 4 or 8, 3 for a block past
 * `blocks`.
 */
int think_keys_logits(const float *query, const uint8_t *codes, const void *scale, int scale_kind,
                      const float *scale_table, const void *zero, int zero_kind, const int32_t *block_index, int64_t heads,
                      int64_t rows, int64_t tokens, int64_t channels, int64_t width, int bits, int64_t block,
                      int64_t blocks, float scaling, float *out) {
#define KEYS(b)                                                                                                      \
    keys_logits(query, codes, scale, scale_kind, scale_table, zero, zero_kind, block_index, heads, rows, tokens, channels,    \
                width, b, block, blocks, scaling, out)
    switch (bits) {
        case 2: return KEYS(2);
        case 4: return KEYS(4);
        case 8: return KEYS(8);
        default: return 2;
    }
#undef KEYS
}

/* ----------------------------------------------------------------------------------------------------- values */
INLINE int values_output(const float *weights, const uint8_t *codes, const void *scale, int scale_kind,
                         const float *scale_table, const void *zero, int zero_kind, float offset, int64_t heads, int64_t rows,
                         int64_t tokens, int64_t channels, int64_t width, const int bits, int64_t group_size,
                         int64_t groups, float *out) {
    const row_layout l = layout_of(bits, width);
    const int64_t nv = l.lanes / 8;
    v8f *work = aligned_alloc(32, sizeof(v8f) * (size_t)(nv * (rows + TILE + 2) + 1)); /* + 1: never 0 bytes */
    int64_t *channel = malloc(sizeof(int64_t) * (size_t)(l.lanes + nv + 1));
    float *sz = malloc(sizeof(float) * (size_t)(2 * groups + 1));
    uint8_t *pad = calloc((size_t)(l.vecs * 8 + 1), 1);
    if (!work || !channel || !sz || !pad) {
        free(work), free(channel), free(sz), free(pad);
        return 1;
    }
    v8f *acc = work, *tile = acc + nv * rows, *sv = tile + nv * TILE, *zv = sv + nv;
    int64_t *vec_group = channel + l.lanes; /* the group of a vector's lanes, -1 when they differ */
    float *s = sz, *z = sz + groups;
    lane_channels(&l, channels, channel);
    for (int64_t v = 0; v < nv; ++v) {
        int64_t g = -2; /* padding lanes (code 0, output unused) go with any group */
        for (int j = 0; j < 8; ++j) {
            const int64_t c = channel[v * 8 + j];
            if (c >= 0) g = g == -2 || g == c / group_size ? c / group_size : -1;
        }
        vec_group[v] = g == -2 ? 0 : g;
    }
    for (int64_t h = 0; h < heads; ++h) {
        const float *w = weights + h * rows * tokens;
        const uint8_t *hc = codes + h * tokens * width;
        const int64_t at_h = h * tokens * groups;
        memset(acc, 0, sizeof(v8f) * (size_t)(nv * rows));
        for (int64_t start = 0; start < tokens; start += TILE) {
            const int64_t n = tokens - start < TILE ? tokens - start : TILE;
            for (int64_t i = 0; i < n; ++i) {
                const int64_t t = start + i, at = at_h + t * groups;
                for (int64_t g = 0; g < groups; ++g) {
                    s[g] = load_at(scale, scale_kind, scale_table, at + g);
                    z[g] = zero ? load_at(zero, zero_kind, NULL, at + g) : -offset * s[g];
                }
                for (int64_t v = 0; v < nv; ++v) {
                    const int64_t g = vec_group[v];
                    if (g >= 0) {
                        const v8f one = {1, 1, 1, 1, 1, 1, 1, 1};
                        sv[v] = one * s[g], zv[v] = one * z[g];
                    } else {
                        float sl[8], zl[8];
                        for (int j = 0; j < 8; ++j) {
                            const int64_t c = channel[v * 8 + j];
                            sl[j] = c < 0 ? 0.0f : s[c / group_size];
                            zl[j] = c < 0 ? 0.0f : z[c / group_size];
                        }
                        memcpy(sv + v, sl, sizeof sl);
                        memcpy(zv + v, zl, sizeof zl);
                    }
                }
                dequantize_row(l, hc + t * width, pad, sv, zv, tile + i * nv);
            }
            tile_accumulate(w + start, tokens, tile, nv, rows, n, acc);
        }
        float *o = out + h * rows * channels;
        for (int64_t r = 0; r < rows; ++r) {
            float lanes[8];
            for (int64_t v = 0; v < nv; ++v) {
                memcpy(lanes, acc + r * nv + v, sizeof lanes);
                for (int j = 0; j < 8; ++j) {
                    const int64_t c = channel[v * 8 + j];
                    if (c >= 0) o[r * channels + c] = lanes[j];
                }
            }
        }
    }
    free(work), free(channel), free(sz), free(pad);
    return 0;
}

/* out[h, r, c] = sum_t weights[h, r, t] * (code[h, t, c] * scale[h, t, g] + zero[h, t, g]), g = c / group_size;
 * symmetric values (zero NULL): zero[h, t, g] = -offset * scale[h, t, g].
 *
 * weights (heads, rows, tokens); codes (heads, tokens, width); scale and zero (heads, tokens, groups), of their kinds;
 * out (heads, rows, channels). A tile of tokens is dequantized into lane vectors (a vector within one group
 * broadcasts its scale and zero point), then accumulated per row with the rows' weights, four rows at a time.
 * Returns 0, 1 when a work buffer could not be allocated, 2 for bits other than 2, 4 or 8.
 */
int think_values_output(const float *weights, const uint8_t *codes, const void *scale, int scale_kind,
                        const float *scale_table, const void *zero, int zero_kind, float offset, int64_t heads, int64_t rows,
                        int64_t tokens, int64_t channels, int64_t width, int bits, int64_t group_size, int64_t groups,
                        float *out) {
#define VALUES(b)                                                                                                    \
    values_output(weights, codes, scale, scale_kind, scale_table, zero, zero_kind, offset, heads, rows, tokens, channels,     \
                  width, b, group_size, groups, out)
    switch (bits) {
        case 2: return VALUES(2);
        case 4: return VALUES(4);
        case 8: return VALUES(8);
        default: return 2;
    }
#undef VALUES
}
