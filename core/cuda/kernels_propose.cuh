// The proposal sampler on the device: every leaf's weight and their prefix
// sums, the draws' leaves, and each draw's target from its leaf's softmax.
//
// Private to core/cuda: included only by device_mirror.cu (one translation
// unit: nvcc gives template kernels internal linkage, so the kernels are
// compiled where the Mirror launches them).
#ifndef NEGMINE_CORE_CUDA_KERNELS_PROPOSE_CUH_
#define NEGMINE_CORE_CUDA_KERNELS_PROPOSE_CUH_

#include <cub/cub.cuh>

#include <cstddef>
#include <cstdint>

#include "core/cuda/kernels.cuh"

namespace negmine {
namespace device_internal {

// The proposal's random numbers, as the CPU tree's (Searcher::DrawKey in
// core/tree/searcher.h): draw t of query i uses KeyUniform(DrawKey(seed, i,
// t), which); 0 picks its leaf.
__device__ __forceinline__ uint64_t DrawKey(uint64_t seed, uint32_t query, uint64_t t) {
  return Mix64(Mix64(seed ^ Mix64(query + 0x632be59bd9b4e019ULL)) + 4 * t);
}
__device__ __forceinline__ double KeyUniform(uint64_t key, uint64_t which) {
  return (static_cast<double>(Mix64(key + which) >> 11) + 0.5) * 0x1p-53;
}

// Block sum / max of one value per thread (every thread gets the result).
template <bool kMax>
__device__ float BlockReduce(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(~0u, v, o);
    v = kMax ? fmaxf(v, w) : v + w;
  }
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < kThreads / 32; ++w) v = kMax ? fmaxf(v, red[w]) : v + red[w];
  return v;
}

// One block per query q of a group: every leaf's log weight
//   lw_f = <q, c_f>/tau + log n_f + |q|^2 spread_f / (2 dim tau^2),
// n_f counting the eligible targets (the (leaf, excluded count) pairs of
// query query_base + q), in place of its center score in lw[q * ld ..]; the
// prefix sums of exp(lw - top) in double into cdf[q * ld ..]; top and the
// total into top[q], total[q].
__global__ void __launch_bounds__(kThreads)
    LeafWeightsKernel(float* lw, double* cdf, size_t ld, size_t num_leaves,
                      const uint32_t* leaf_count, const float* spread, const float* queries,
                      int stride, int dim, float inv_tau, const uint32_t* pair_offsets,
                      const uint32_t* pair_leaf, const uint32_t* pair_count,
                      uint32_t query_base, float* top, double* total) {
  using Scan = cub::BlockScan<double, kThreads>;
  __shared__ typename Scan::TempStorage scan_temp;
  __shared__ float red[kThreads / 32];
  __shared__ double s_carry;
  const uint32_t q = blockIdx.x;
  const int tid = threadIdx.x;
  float sq = 0;
  for (int j = tid; j < stride; j += kThreads) {
    const float v = queries[size_t{q} * stride + j];
    sq += v * v;
  }
  sq = BlockReduce<false>(sq, red);
  const float scale = sq / (2.0f * dim) * inv_tau * inv_tau;
  float* row = lw + q * ld;
  for (size_t f = tid; f < num_leaves; f += kThreads) {
    const float n = static_cast<float>(leaf_count[f]);
    row[f] = row[f] * inv_tau + logf(n) + spread[f] * scale;
  }
  __syncthreads();
  if (pair_offsets != nullptr) {
    const uint32_t qi = query_base + q;
    for (uint32_t i = pair_offsets[qi] + tid; i < pair_offsets[qi + 1]; i += kThreads) {
      const uint32_t f = pair_leaf[i], k = pair_count[i];
      const uint32_t n = leaf_count[f];
      row[f] = k >= n ? -INFINITY
                      : row[f] - logf(static_cast<float>(n)) + logf(static_cast<float>(n - k));
    }
    __syncthreads();
  }
  float m = -INFINITY;
  for (size_t f = tid; f < num_leaves; f += kThreads) m = fmaxf(m, row[f]);
  m = BlockReduce<true>(m, red);
  if (!isfinite(m)) {  // overflow (+inf or NaN), or no eligible target
    if (tid == 0) {
      top[q] = m;
      total[q] = 0;
    }
    return;
  }
  double carry = 0;
  for (size_t base = 0; base < num_leaves; base += kThreads) {
    const size_t f = base + tid;
    const double w = f < num_leaves ? exp(static_cast<double>(row[f] - m)) : 0.0;
    double incl;
    Scan(scan_temp).InclusiveSum(w, incl);
    if (f < num_leaves) cdf[q * ld + f] = carry + incl;
    if (tid == kThreads - 1) s_carry = carry + incl;
    __syncthreads();
    carry = s_carry;
    __syncthreads();
  }
  if (tid == 0) {
    top[q] = m;
    total[q] = carry;
  }
}

// One block per query q of a group: its draws' leaves, each the first leaf
// whose prefix sum exceeds u * total (so never a leaf of weight 0), with
// log P(leaf) and the draw's key. The draws of q are draw_offsets[q] ..
// draw_offsets[q + 1]; an overflowed query's draws get leaf kNoRow and a
// NaN log P.
__global__ void DrawLeafKernel(const float* lw, const double* cdf, size_t ld,
                               size_t num_leaves, const float* top, const double* total,
                               const uint32_t* draw_offsets, const uint64_t* first_draw,
                               const uint32_t* query_ids, uint64_t seed, uint32_t query_base,
                               uint32_t* draw_leaf, double* draw_log_p, uint64_t* draw_key) {
  const uint32_t q = blockIdx.x, qi = query_base + q;
  const uint32_t gid = query_ids != nullptr ? query_ids[qi] : qi;
  const double sum = total[q];
  const double log_total = static_cast<double>(top[q]) + log(sum);
  const bool ok = isfinite(log_total) && sum > 0;
  const double* c = cdf + q * ld;
  const uint32_t begin = draw_offsets[q], count = draw_offsets[q + 1] - begin;
  for (uint32_t t = threadIdx.x; t < count; t += blockDim.x) {
    const uint32_t d = begin + t;
    const uint64_t key = DrawKey(seed, gid, first_draw[qi] + t);
    draw_key[d] = key;
    if (!ok) {
      draw_leaf[d] = kNoRow;
      draw_log_p[d] = NAN;
      continue;
    }
    const double u = KeyUniform(key, 0) * sum;
    size_t lo = 0, hi = num_leaves;  // first f with c[f] > u
    while (lo < hi) {
      const size_t mid = (lo + hi) / 2;
      if (c[mid] > u) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    // u rounded up to the total: the last leaf of positive weight.
    size_t f = lo < num_leaves ? lo : num_leaves - 1;
    while (f > 0 && c[f] == c[f - 1]) --f;
    draw_leaf[d] = static_cast<uint32_t>(f);
    draw_log_p[d] = static_cast<double>(lw[q * ld + f]) - log_total;
  }
}

// One warp per draw (num_draws of them, the draws of query q of the group
// at draw_offsets[q] ..): the drawn leaf's eligible members scored, a lane
// per member; one of them by Gumbel-max over s/tau + noise (an exact draw
// from the leaf's softmax), and the leaf's log Z on the way. out[d]: key
// log q = log P(leaf) + s/tau - log Z_leaf, NaN (row kNoRow) for an
// overflow, -inf (row kNoRow) when the leaf had no eligible member.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    DrawTargetKernel(const T* vectors, int stride, const float* queries, size_t g,
                     const uint32_t* draw_offsets, size_t num_draws, Leaves leaves,
                     const uint32_t* excl_offsets,
                     const uint32_t* excl_rows, uint32_t query_base,
                     const uint32_t* draw_leaf, const double* draw_log_p,
                     const uint64_t* draw_key, float inv_tau, Cand* out) {
  const size_t d = (blockIdx.x * size_t{blockDim.x} + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (d >= num_draws) return;  // the whole warp
  const uint32_t leaf = draw_leaf[d];
  if (leaf == kNoRow) {
    if (lane == 0) out[d] = Cand{NAN, 0.0f, kNoRow};
    return;
  }
  // The draw's query: the last q with draw_offsets[q] <= d.
  size_t lo = 0, hi = g;
  while (hi - lo > 1) {
    const size_t mid = (lo + hi) / 2;
    if (draw_offsets[mid] <= d) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const size_t q = lo;
  const float* qv = queries + q * stride;
  const uint32_t ex_lo = excl_offsets != nullptr ? excl_offsets[query_base + q] : 0;
  const uint32_t ex_hi = excl_offsets != nullptr ? excl_offsets[query_base + q + 1] : 0;
  const uint64_t key = draw_key[d];
  const uint32_t begin = leaves.begin[leaf], size = leaves.count[leaf];
  // Online log-sum-exp (m, sum) and the best perturbed key, per lane.
  float m = -INFINITY, sum = 0, best = -INFINITY, best_score = 0;
  uint32_t best_row = kNoRow, best_r = 0;
  for (uint32_t r = lane; r < size; r += 32) {
    const uint32_t row = leaves.pool[begin + r];
    if (ex_lo < ex_hi && Contains(excl_rows, ex_lo, ex_hi, row)) continue;
    const T* x = vectors + size_t{row} * stride;
    float s = 0;
    for (int c = 0; c < stride / 8; ++c) s += Elem<T>::Dot8(x + c * 8, qv + c * 8);
    const float l = s * inv_tau;
    if (l > m) {
      sum = sum * expf(m - l) + 1.0f;
      m = l;
    } else {
      sum += expf(l - m);
    }
    const double u = KeyUniform(key ^ Mix64(r + 0x5851f42d4c957f2dULL), 1);
    const float k = l + static_cast<float>(-log(-log(u)));
    if (k > best) {
      best = k;
      best_score = s;
      best_row = row;
      best_r = r;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(~0u, m, o), sum2 = __shfl_xor_sync(~0u, sum, o);
    const float mm = fmaxf(m, m2);
    sum = (m == -INFINITY ? 0.0f : sum * expf(m - mm)) +
          (m2 == -INFINITY ? 0.0f : sum2 * expf(m2 - mm));
    m = mm;
    const float b2 = __shfl_xor_sync(~0u, best, o), s2 = __shfl_xor_sync(~0u, best_score, o);
    const uint32_t row2 = __shfl_xor_sync(~0u, best_row, o), r2 = __shfl_xor_sync(~0u, best_r, o);
    if (b2 > best || (b2 == best && row2 != kNoRow && (best_row == kNoRow || r2 < best_r))) {
      best = b2;
      best_score = s2;
      best_row = row2;
      best_r = r2;
    }
  }
  if (lane != 0) return;
  if (best_row == kNoRow) {
    out[d] = Cand{-INFINITY, 0.0f, kNoRow};
    return;
  }
  const double log_z = static_cast<double>(m) + log(static_cast<double>(sum));
  const double log_q = draw_log_p[d] + static_cast<double>(best_score) * inv_tau - log_z;
  out[d] = isfinite(log_q) ? Cand{static_cast<float>(log_q), best_score, best_row}
                           : Cand{NAN, 0.0f, kNoRow};
}

}  // namespace device_internal
}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_KERNELS_PROPOSE_CUH_
