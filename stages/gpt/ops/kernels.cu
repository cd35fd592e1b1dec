// nanoflow's fused CUDA kernels: the CUDA halves of ops.rs's CustomOps, each the same arithmetic
// as its CPU kernel there (which the tests check against candle's plain ops). Compiled to PTX by
// build.rs with `--features cuda` and embedded in the binary. All float32, contiguous rows.
//
// Row-wise kernels run one block of ROW_THREADS threads per row; reductions go through warp
// shuffles and one shared word per warp.

#include <stdint.h>

#define GELU_K 0.7978845608028654f
#define GELU_C 0.044715f
#define ROW_THREADS 256

// The sum of `v` over the block, on every thread. Safe to call repeatedly.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // the previous call's readers are done with `partial` and `total`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) >> 5;
        v = lane < warps ? partial[lane] : 0.0f;
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// The max of `v` over the block, on every thread.
__device__ float block_max(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) >> 5;
        v = lane < warps ? partial[lane] : -INFINITY;
        for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// ---------------------------------------------------------------------------------------------
// GELU, tanh approximation

extern "C" __global__ void gelu_fwd(const float* x, float* y, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + tanhf(GELU_K * (v + GELU_C * v * v * v)));
    }
}

extern "C" __global__ void gelu_bwd(const float* x, const float* grad, float* dx, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        float v = x[i], v2 = v * v;
        float t = tanhf(GELU_K * (v + GELU_C * v2 * v));
        float du = GELU_K * (1.0f + 3.0f * GELU_C * v2);
        dx[i] = grad[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du);
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm's normalization (no affine): y = (x - mean) / sqrt(var + eps), per row

__device__ void row_moments(const float* x, uint32_t width, float eps, float* mean, float* rstd) {
    float sum = 0.0f;
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) sum += x[j];
    float m = block_sum(sum) / width;
    float sq = 0.0f;
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) sq += (x[j] - m) * (x[j] - m);
    *mean = m;
    *rstd = rsqrtf(block_sum(sq) / width + eps);
}

extern "C" __global__ void normalize_fwd(const float* x, float* y, uint32_t width, float eps) {
    const float* row = x + (uint64_t)blockIdx.x * width;
    float* out = y + (uint64_t)blockIdx.x * width;
    float mean, rstd;
    row_moments(row, width, eps, &mean, &rstd);
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) out[j] = (row[j] - mean) * rstd;
}

// dx = rstd * (g - mean(g) - x̂ * mean(g * x̂))
extern "C" __global__ void normalize_bwd(const float* x, const float* grad, float* dx, uint32_t width, float eps) {
    uint64_t base = (uint64_t)blockIdx.x * width;
    const float* row = x + base;
    const float* g = grad + base;
    float mean, rstd;
    row_moments(row, width, eps, &mean, &rstd);
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) {
        sum_g += g[j];
        sum_gx += g[j] * (row[j] - mean) * rstd;
    }
    float mean_g = block_sum(sum_g) / width;
    float mean_gx = block_sum(sum_gx) / width;
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) {
        dx[base + j] = rstd * (g[j] - mean_g - (row[j] - mean) * rstd * mean_gx);
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax of attention scores (..., T, past + T): row r is query past + r % T, which sees
// keys 0..=past + r % T; the rest of its row is 0.

extern "C" __global__ void causal_softmax_fwd(const float* scores, float* p, uint32_t t, uint32_t keys, uint32_t past, float scale) {
    uint64_t base = (uint64_t)blockIdx.x * keys;
    uint32_t seen = past + blockIdx.x % t + 1;
    float max = -INFINITY;
    for (uint32_t j = threadIdx.x; j < seen; j += blockDim.x) max = fmaxf(max, scores[base + j] * scale);
    max = block_max(max);
    float sum = 0.0f;
    for (uint32_t j = threadIdx.x; j < seen; j += blockDim.x) sum += __expf(scores[base + j] * scale - max);
    float inverse = 1.0f / block_sum(sum);
    for (uint32_t j = threadIdx.x; j < keys; j += blockDim.x) {
        p[base + j] = j < seen ? __expf(scores[base + j] * scale - max) * inverse : 0.0f;
    }
}

// ds = scale * p * (g - sum(g * p))
extern "C" __global__ void softmax_bwd(const float* p, const float* grad, float* ds, uint32_t width, float scale) {
    uint64_t base = (uint64_t)blockIdx.x * width;
    float dot = 0.0f;
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) dot += p[base + j] * grad[base + j];
    dot = block_sum(dot);
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) {
        ds[base + j] = scale * p[base + j] * (grad[base + j] - dot);
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over a vocabulary row: loss = logsumexp(logits) - logits[target]; its gradient
// (softmax - one_hot(target)) * dloss, recomputing the row's max and sum rather than storing the
// (rows, V) softmax.

__device__ void row_logsumexp(const float* row, uint32_t width, float* max, float* sum) {
    float m = -INFINITY;
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m);
    float s = 0.0f;
    for (uint32_t j = threadIdx.x; j < width; j += blockDim.x) s += __expf(row[j] - m);
    *max = m;
    *sum = block_sum(s);
}

extern "C" __global__ void cross_entropy_fwd(const float* logits, const uint32_t* targets, float* loss, uint32_t vocab) {
    const float* row = logits + (uint64_t)blockIdx.x * vocab;
    float max, sum;
    row_logsumexp(row, vocab, &max, &sum);
    if (threadIdx.x == 0) loss[blockIdx.x] = logf(sum) + max - row[targets[blockIdx.x]];
}

extern "C" __global__ void cross_entropy_bwd(const float* logits, const uint32_t* targets, const float* grad, float* dlogits, uint32_t vocab) {
    uint64_t base = (uint64_t)blockIdx.x * vocab;
    float max, sum;
    row_logsumexp(logits + base, vocab, &max, &sum);
    float inverse = 1.0f / sum, g = grad[blockIdx.x];
    uint32_t target = targets[blockIdx.x];
    for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) {
        float p = __expf(logits[base + j] - max) * inverse;
        dlogits[base + j] = (p - (j == target ? 1.0f : 0.0f)) * g;
    }
}
