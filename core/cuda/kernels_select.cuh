// The selection kernels of the Scan and the Beam: the exclusion mask, the
// radix select of the best k per segment of scores (or of candidates), the
// per-query bounds and log Z, and the Beam's leaf scoring and ordering.
//
// Private to core/cuda: included only by device_mirror.cu (one translation
// unit: nvcc gives template kernels internal linkage, so the kernels are
// compiled where the Mirror launches them).
#ifndef NEGMINE_CORE_CUDA_KERNELS_SELECT_CUH_
#define NEGMINE_CORE_CUDA_KERNELS_SELECT_CUH_

#include <cstddef>
#include <cstdint>

#include "core/cuda/kernels.cuh"

namespace negmine {
namespace device_internal {

enum SelectMode { kScores = 0, kGumbel = 1, kLeafCenters = 2, kHits = 3 };

struct SelectArgs {
  // kScores / kGumbel / kLeafCenters: scores[q * ld + i], i < count; the row
  // of i is row_base + i (for leaves: the leaf).
  const float* scores;
  size_t ld;
  size_t count;
  uint32_t row_base;
  const uint8_t* live;  // kScores / kGumbel
  // kScores / kGumbel, optional: per query of the launch, a key below which
  // nothing can reach the final top k (the k-th best key found so far).
  const float* min_key;
  float inv_tau;
  uint64_t seed;
  uint32_t query_base;   // global index of query 0 of the launch (noise)
  // kHits: hits[q * ld + i], i < (lens ? lens[q] : count).
  const Cand* hits;
  const uint32_t* lens;
  // Out: k hits per segment at out[q * out_ld + segment * k].
  Cand* out;
  size_t out_ld;
  int k;
  // Optional: per (query, segment) {max, sum} of exp(s * inv_tau - max),
  // at lse[q * lse_ld + lse_seg + segment].
  float2* lse;
  size_t lse_ld;
  size_t lse_seg;
};

// Standard Gumbel noise, a pure function of (seed, query, row): the same
// draw whatever the chunking. 24-bit uniforms: the noise is capped near 17,
// a tail of probability 3e-8.
__device__ __forceinline__ float Gumbel(uint64_t seed, uint32_t query,
                                        uint32_t row) {
  const uint64_t h =
      Mix64(seed ^ Mix64((uint64_t{query} << 32) | row));
  const float u = (static_cast<float>(h >> 40) + 0.5f) * 0x1p-24f;
  return -__logf(-__logf(u));
}

// A float's bits, reordered so that unsigned order is float order; 0 is
// kept for "no value" (no finite float maps to it).
__device__ __forceinline__ uint32_t OrderedKey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The inverse of OrderedKey.
__device__ __forceinline__ float KeyToFloat(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// Excluded rows of each query score -inf in the chunk [begin, begin + count).
__global__ void MaskExcludedKernel(float* scores, size_t ld, size_t begin,
                                   size_t count, const uint32_t* offsets,
                                   const uint32_t* rows, uint32_t query_base) {
  const uint32_t q = blockIdx.x;
  const uint32_t lo = offsets[query_base + q], hi = offsets[query_base + q + 1];
  for (uint32_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const size_t r = rows[i];
    if (r >= begin && r < begin + count) {
      scores[q * ld + (r - begin)] = -INFINITY;
    }
  }
}

// Keeps the best k of one segment of kSegment values of one query: a 4-pass
// radix select (8 bits per pass) for the k-th key in shared memory, then the
// keys above it and, in index order, as many keys equal to it as fit. One
// block of kThreads per (segment, query).
template <int kMode>
__global__ void __launch_bounds__(kThreads) SelectKernel(SelectArgs a) {
  const int tid = threadIdx.x;
  const uint32_t q = blockIdx.y;
  const size_t seg = blockIdx.x;
  uint32_t key[kPerThread];
  float score[kPerThread];
  uint32_t row[kPerThread];
  float lse_max = -INFINITY;

  size_t count = a.count;
  if (kMode == kHits && a.lens != nullptr) count = a.lens[q];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const size_t idx = seg * kSegment + i * kThreads + tid;
    key[i] = 0;
    score[i] = 0;
    row[i] = kNoRow;
    if (idx >= count) continue;
    if (kMode == kHits) {
      const Cand h = a.hits[q * a.ld + idx];
      if (h.row != kNoRow) {
        key[i] = OrderedKey(h.key);
        score[i] = h.score;
        row[i] = h.row;
      }
    } else {
      const float s = a.scores[q * a.ld + idx];
      const uint32_t r = a.row_base + static_cast<uint32_t>(idx);
      if (kMode == kLeafCenters) {
        key[i] = OrderedKey(s);
        score[i] = s;
        row[i] = r;
      } else if (s != -INFINITY && a.live[r]) {
        const float k = kMode == kGumbel
                            ? s * a.inv_tau + Gumbel(a.seed, a.query_base + q, r)
                            : s;
        score[i] = s;
        row[i] = r;
        lse_max = fmaxf(lse_max, s * a.inv_tau);
        // Below the bound: eligible (log Z counts it) but never selected.
        key[i] = a.min_key != nullptr && k < a.min_key[q] ? 0 : OrderedKey(k);
      }
    }
  }

  __shared__ float red[kThreads / 32];
  __shared__ uint32_t hist[257];  // bin 256: lanes with no value
  __shared__ uint32_t warp_count[kThreads / 32];
  __shared__ uint32_t s_digit, s_need, s_gt;
  const int lane = tid & 31, warp = tid >> 5;

  if (kMode <= kGumbel && a.lse != nullptr) {
    // log-sum-exp partial of this segment: block max, then block sum.
    float m = lse_max;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(~0u, m, o));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = red[0];
    for (int w = 1; w < kThreads / 32; ++w) m = fmaxf(m, red[w]);
    __syncthreads();
    float sum = 0;
    if (m != -INFINITY) {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        if (row[i] != kNoRow) sum += __expf(score[i] * a.inv_tau - m);
      }
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(~0u, sum, o);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    if (tid == 0) {
      float total = 0;
      for (int w = 0; w < kThreads / 32; ++w) total += red[w];
      a.lse[q * a.lse_ld + a.lse_seg + seg] = make_float2(m, total);
    }
  }

  // Count the valid values of the block.
  uint32_t valid = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) valid += key[i] != 0;
  if (tid == 0) s_gt = 0;
  __syncthreads();
  atomicAdd(&s_gt, valid);
  __syncthreads();
  const uint32_t total_valid = s_gt;
  const uint32_t k = static_cast<uint32_t>(a.k);
  Cand* out = a.out + q * a.out_ld + seg * k;

  uint32_t threshold = 1;  // take every valid key (there are at most k)
  uint32_t need_eq = 0;
  if (total_valid > k) {
    uint32_t prefix = 0, mask = 0, kk = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[tid] = 0;  // kThreads == 256 bins
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        // Scores share their leading bits, so most lanes of a warp hit the
        // same bin: one atomic per distinct bin per warp.
        const bool in = key[i] != 0 && (key[i] & mask) == prefix;
        const uint32_t bin = in ? (key[i] >> shift) & 255u : 256u;
        const uint32_t peers = __match_any_sync(~0u, bin);
        if (in && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
      __syncthreads();
      if (warp == 0) {
        // Lane l holds bins 255 - 8l .. 248 - 8l (descending order).
        uint32_t c[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          c[j] = hist[255 - lane * 8 - j];
          sum += c[j];
        }
        uint32_t incl = sum;
        for (int o = 1; o < 32; o <<= 1) {
          const uint32_t v = __shfl_up_sync(~0u, incl, o);
          if (lane >= o) incl += v;
        }
        const uint32_t excl = incl - sum;
        if (excl < kk && kk <= incl) {
          uint32_t acc = excl;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (acc + c[j] >= kk) {
              s_digit = 255 - lane * 8 - j;
              s_need = kk - acc;
              break;
            }
            acc += c[j];
          }
        }
      }
      __syncthreads();
      prefix |= s_digit << shift;
      mask |= 255u << shift;
      kk = s_need;
      __syncthreads();
    }
    threshold = prefix;  // the k-th largest key
    need_eq = kk;        // how many keys equal to it are kept
  }

  // Keys above the threshold: any order.
  if (tid == 0) s_gt = 0;
  __syncthreads();
  const bool strict = total_valid > k;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    if (key[i] != 0 && (strict ? key[i] > threshold : true)) {
      const uint32_t pos = atomicAdd(&s_gt, 1u);
      out[pos] = Cand{KeyToFloat(key[i]), score[i], row[i]};
    }
  }
  __syncthreads();
  const uint32_t num_gt = s_gt;
  // Keys equal to the threshold, lowest index first (deterministic ties):
  // an ordered pass only when some of them must be left out.
  uint32_t num_eq = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) num_eq += strict && key[i] == threshold;
  if (tid == 0) s_need = 0;
  __syncthreads();
  atomicAdd(&s_need, num_eq);
  __syncthreads();
  const bool ordered = strict && s_need > need_eq;
  if (strict && !ordered) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (key[i] == threshold) {
        const uint32_t pos = atomicAdd(&s_gt, 1u);
        out[pos] = Cand{KeyToFloat(key[i]), score[i], row[i]};
      }
    }
  }
  uint32_t base = 0;
  if (ordered) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const bool flag = key[i] == threshold;
      const uint32_t ballot = __ballot_sync(~0u, flag);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();
      uint32_t offset = base;
      for (int w = 0; w < warp; ++w) offset += warp_count[w];
      offset += __popc(ballot & ((1u << lane) - 1u));
      if (flag && offset < need_eq) {
        out[num_gt + offset] = Cand{KeyToFloat(key[i]), score[i], row[i]};
      }
      for (int w = 0; w < kThreads / 32; ++w) base += warp_count[w];
      __syncthreads();
    }
  }
  // Pad to k with "no hit".
  const uint32_t filled = strict ? k : num_gt;
  for (uint32_t j = filled + tid; j < k; j += kThreads) {
    out[j] = Cand{0.0f, 0.0f, kNoRow};
  }
}

__global__ void FillKernel(float* p, size_t n, float v) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    p[i] = v;
  }
}

// bound[q] = max(bound[q], the smallest key of hits[q * ld .. + k]) when all
// k are hits: the final k-th best key is at least that.
__global__ void RaiseBoundKernel(const Cand* hits, size_t ld, int k, float* bound) {
  const uint32_t q = blockIdx.x;
  float m = INFINITY;
  bool full = true;
  for (int j = threadIdx.x; j < k; j += 32) {
    const Cand h = hits[q * ld + j];
    full = full && h.row != kNoRow;
    m = fminf(m, h.key);
  }
  for (int o = 16; o > 0; o >>= 1) m = fminf(m, __shfl_xor_sync(~0u, m, o));
  full = __all_sync(~0u, full);
  if (threadIdx.x == 0 && full) bound[q] = fmaxf(bound[q], m);
}

// log Z per query from the segments' {max, sum} partials.
__global__ void LogSumExpKernel(const float2* lse, size_t ld, size_t segs,
                                double* out) {
  const uint32_t q = blockIdx.x;
  __shared__ float s_max[kThreads];
  __shared__ double s_sum[kThreads];
  float m = -INFINITY;
  for (size_t i = threadIdx.x; i < segs; i += blockDim.x) {
    m = fmaxf(m, lse[q * ld + i].x);
  }
  s_max[threadIdx.x] = m;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) s_max[threadIdx.x] = fmaxf(s_max[threadIdx.x], s_max[threadIdx.x + o]);
    __syncthreads();
  }
  m = s_max[0];
  double sum = 0;
  if (m != -INFINITY) {
    for (size_t i = threadIdx.x; i < segs; i += blockDim.x) {
      const float2 p = lse[q * ld + i];
      if (p.x != -INFINITY) sum += double{p.y} * exp(double{p.x} - m);
    }
  }
  s_sum[threadIdx.x] = sum;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) s_sum[threadIdx.x] += s_sum[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[q] = m == -INFINITY ? -INFINITY : double{m} + log(s_sum[0]);
  }
}

// One block per query: scores the members of the query's selected leaves
// (leaf_hits[q * num_leaves ..], row = leaf) into out[q * cap ..], and their
// number into lens[q]. A group of `group` lanes reads one row, 8 elements
// (16 or 32 bytes) per lane per step.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ScoreLeavesKernel(const T* vectors, int stride, const float* queries,
                      const Cand* leaf_hits, int num_leaves, Leaves leaves,
                      const uint32_t* order, int group, Cand* out, size_t cap,
                      uint32_t* lens) {
  extern __shared__ float shared[];
  float* qs = shared;                                        // stride
  uint32_t* pos = reinterpret_cast<uint32_t*>(qs + stride);  // num_leaves + 1
  const uint32_t q = order[blockIdx.x];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int j = tid; j < stride; j += kThreads) qs[j] = queries[size_t{q} * stride + j];
  // Each leaf's first slot: a serial prefix in one thread (num_leaves is a
  // beam width, small next to the rows scored).
  for (int p = tid; p < num_leaves; p += kThreads) {
    const uint32_t leaf = leaf_hits[size_t{q} * num_leaves + p].row;
    pos[p + 1] = leaf == kNoRow ? 0 : leaves.count[leaf];
  }
  __syncthreads();
  if (tid == 0) {
    pos[0] = 0;
    for (int p = 0; p < num_leaves; ++p) pos[p + 1] += pos[p];
    lens[q] = pos[num_leaves];
  }
  __syncthreads();
  const int chunks = stride / 8;
  const int rows_per_step = 32 / group;
  const int sub = lane / group, part = lane % group;
  for (int p = warp; p < num_leaves; p += kThreads / 32) {
    const uint32_t leaf = leaf_hits[size_t{q} * num_leaves + p].row;
    if (leaf == kNoRow) continue;
    const uint32_t begin = leaves.begin[leaf], size = leaves.count[leaf];
    for (uint32_t r0 = 0; r0 < size; r0 += rows_per_step) {
      const uint32_t r = r0 + sub;
      float s = 0;
      uint32_t row = kNoRow;
      if (r < size) {
        row = leaves.pool[begin + r];
        const T* x = vectors + size_t{row} * stride;
        for (int c = part; c < chunks; c += group) s += Elem<T>::Dot8(x + c * 8, qs + c * 8);
      }
      for (int o = group / 2; o > 0; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
      if (r < size && part == 0) {
        out[size_t{q} * cap + pos[p] + r] = Cand{s, s, row};
      }
    }
  }
}

// keys[q] = the leaf of query q's best center score among its `width`
// selected leaves, values[q] = q: sorting by it runs the queries that visit
// the same leaves side by side, so their rows are read from L2.
__global__ void BestLeafKernel(const Cand* leaf_hits, int width, uint32_t* keys,
                               uint32_t* values) {
  const uint32_t q = blockIdx.x;
  float best = -INFINITY;
  uint32_t leaf = 0;
  for (int p = threadIdx.x; p < width; p += 32) {
    const Cand h = leaf_hits[size_t{q} * width + p];
    if (h.row != kNoRow && h.key > best) {
      best = h.key;
      leaf = h.row;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float b = __shfl_xor_sync(~0u, best, o);
    const uint32_t l = __shfl_xor_sync(~0u, leaf, o);
    if (b > best || (b == best && l < leaf)) {
      best = b;
      leaf = l;
    }
  }
  if (threadIdx.x == 0) {
    keys[q] = leaf;
    values[q] = q;
  }
}

}  // namespace device_internal
}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_KERNELS_SELECT_CUH_
