// DeviceMirror: a collection's scoring vectors, and its tree's leaf level,
// resident in GPU memory, with the kernels that mine them. Plain header: no
// CUDA types, so every translation unit includes it whether or not CUDA is
// built (without CUDA, Create returns UNIMPLEMENTED).
//
// The host index (StoreIndex) stays the authority: it validates and applies
// every write, logs it, snapshots it and runs the drift fit and the tree
// maintenance. The mirror holds a copy of what is scored, uploaded through
// pinned staging buffers on the mirror's own stream:
//
//   device memory (one collection)
//   vectors: capacity x stride elements of the collection's dtype (float32,
//            float16 or bfloat16); stride = dim rounded up to 8 (zero pad),
//            so rows are 16-byte aligned for vector loads and tensor cores
//   live:    capacity bytes, 1 for a live row
//   ids:     capacity uint64 target ids (results carry ids, not only rows)
//   leaves:  L x stride centers (same dtype), spreads, and the host tree's
//            member pool (store rows) with each leaf's begin and count; the
//            pool is updated by the runs that changed
//   scratch: the score block of one GEMM (at most kScoreBudget floats) and
//            the candidate lists
//
// Algorithms (all batched: a call mines every query of a batch):
//   Scan:  brute force. The batch is scored against a chunk of rows with one
//          cuBLAS GEMM (tensor cores for float16 / bfloat16, float32
//          accumulation), then a selection kernel keeps the best `k` of each
//          segment of 4096 scores (a 4-pass radix select in shared memory,
//          ties at the threshold taken by lowest row), and the segments'
//          candidates are reduced by the same kernel. Each chunk's k-th best
//          key becomes a per-query bound below which later chunks select
//          nothing (most segments then skip the radix passes). With `gumbel`, the key
//          is s/tau + Gumbel(seed, query, row), which makes the top k a
//          sample without replacement from the softmax (Gumbel-top-k);
//          `want_log_z` also reduces log sum exp(s/tau) per query.
//   Fused scan (off by default, see set_fused_scan): blocks of 64 queries
//          x 128 targets on tensor cores (WMMA); each score that reaches
//          its query's bound is appended to the query's candidates. Rows go
//          in chunks that grow as the bound (the k-th best so far) rises,
//          and after each chunk the candidates are cut back to the best k
//          by the selection kernel. At d = 128 a materialized score matrix
//          caps the GEMM near copy bandwidth x 64 FLOP/byte; here only the
//          candidates are written.
//   Beam:  the tree's leaves routed for the whole batch: one GEMM of the
//          queries against the leaf centers, the `leaves` best center scores
//          per query selected as above (as IVF routes; the ball bound
//          <q, c> + ||q|| r favours wide leaves and routed far worse: recall
//          0.58 against 0.9+ at 128 leaves of 1M targets); then one block
//          per query scores the members of its leaves (16-byte loads, a
//          group of lanes per row) and the best k are selected.
//   Propose: the tree's proposal sampler. The same routing GEMM gives every
//          leaf's weight; one block per query turns the weights into a
//          prefix sum (in double) that each draw searches with its own
//          counter-based uniform; then one warp per draw scores the drawn
//          leaf's members and takes one by Gumbel-max (an exact draw from
//          the leaf's softmax), computing the leaf's log Z on the way. Every
//          leaf is its own component of the proposal: the routing GEMM
//          scores them all anyway, so the CPU's coarse groups save nothing
//          here.
//   Exact sampling (Sampler::kExact, and every SAMPLE on an exact
//          collection) is Gumbel-top-k over the Scan, on trees too: a tree
//          sampler by bounds needs log Z certified to log_z_width, and at
//          d = 128 the ball bounds are loose enough (the CPU's frontier
//          accepts ~2e-4 of its draws at tau 0.05) that this means scoring
//          nearly every leaf, which the Scan's GEMM does faster.
// Excluded rows (per query) get no score in Scan, so sampling and log Z are
// over the eligible rows. Dead rows are skipped by the live mask.
//
// Errors: out of device memory is RESOURCE_EXHAUSTED (the mirror and its
// data stay as they were); any other CUDA failure is INTERNAL, with the
// CUDA error's name.
//
// Thread safety: none; the owning index serializes calls (one stream).
#ifndef NEGMINE_CORE_CUDA_DEVICE_MIRROR_H_
#define NEGMINE_CORE_CUDA_DEVICE_MIRROR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/drift/drift.h"
#include "core/index.h"

namespace negmine {

struct PointSource;

// One selected target: its ranking key (the score for top-k, the perturbed
// key for Gumbel-top-k), its score, its store row and its id.
struct DeviceHit {
  float key;
  float score;
  uint32_t row;
  uint64_t id;
};

// A fitted drift correction x -> x + k(x, L) C (core/drift/drift.h), as
// plain arrays: kernel kLinear <x, l>, kGaussian exp(-||x - l||^2 / width),
// kExpInner exp(min((<x, l> - center) / width, 60)).
struct DeviceDriftModel {
  DriftKernel kernel = DriftKernel::kNone;
  float width = 1, center = 0;
  const float* landmarks = nullptr;  // m x dim
  const float* coef = nullptr;       // m x dim
  size_t m = 0;
};

class DeviceMirror {
 public:
  // Largest k a device selection takes (k + rank window + exclusions).
  static constexpr int kMaxK = 2048;
  // The row of a missing hit.
  static constexpr uint32_t kNoRow = 0xffffffffu;

  // A mirror for vectors of `dim` stored as `dtype`, on CUDA device `device`.
  //   UNIMPLEMENTED: CUDA is not built. FAILED_PRECONDITION: no such device.
  static absl::StatusOr<std::unique_ptr<DeviceMirror>> Create(
      int dim, DeviceDtype dtype, int device = 0);

  virtual ~DeviceMirror() = default;

  // Makes room for `rows` rows (keeps the content); RESOURCE_EXHAUSTED when
  // the device is out of memory.
  virtual absl::Status Reserve(size_t rows) = 0;
  // Uploads rows `rows` of `points` (scoring space, row-major dim floats),
  // their live flags (live[row] != 0) and ids (ids[row]); rows must be < the
  // reserved count.
  virtual absl::Status SetRows(const PointSource& points,
                               absl::Span<const uint32_t> rows,
                               const uint8_t* live, const uint64_t* ids) = 0;
  // Uploads rows [0, num_rows) and sets the row count scans cover.
  virtual absl::Status SetAll(const PointSource& points, size_t num_rows,
                              const uint8_t* live, const uint64_t* ids) = 0;
  // Rows [0, num_rows) are scanned (after SetRows grew the store).
  virtual void SetNumRows(size_t num_rows) = 0;

  // The tree's leaf level, as the host tree stores it: `centers` L x dim
  // (scoring space), `spreads` L (the mean squared distance of a leaf's
  // targets to its center), and leaf f's members (store rows) at
  // pool[begin[f], begin[f] + count[f]). `centers` empty while L > 0: the
  // same leaves with the same centers as the last call (the structure did
  // not change).
  // The pool is uploaded by the runs that changed since the last call
  // (ChangedRuns), the O(L) arrays whole. INVALID_ARGUMENT for inconsistent
  // arrays; after any error no leaves are held until the next success.
  virtual absl::Status SetLeaves(absl::Span<const float> centers,
                                 absl::Span<const float> spreads,
                                 absl::Span<const uint32_t> begin,
                                 absl::Span<const uint32_t> count,
                                 absl::Span<const uint32_t> pool) = 0;
  // Pool entries the last SetLeaves copied to the device.
  virtual size_t LastPoolUpload() const = 0;
  virtual bool has_leaves() const = 0;

  struct ScanParams {
    int k = 10;             // per query, <= kMaxK
    bool gumbel = false;    // Gumbel-top-k keys instead of scores
    float inv_tau = 20.0f;  // 1 / temperature (gumbel, log Z)
    uint64_t seed = 0;      // Gumbel noise of (seed, query, row)
    bool want_log_z = false;
    // Per query q, the rows exclude_rows[exclude_offsets[q] ..
    // exclude_offsets[q + 1]) are not eligible. Empty: none.
    std::vector<uint32_t> exclude_offsets, exclude_rows;
  };
  // `queries` n x dim, in scoring space (cosine: unit length). For each
  // query q, its best min(k, eligible) hits, unordered, into
  // (*hits)[q * k, (q + 1) * k), the missing ones with row kNoRow; with
  // want_log_z, log sum over eligible rows of exp(s * inv_tau) into
  // (*log_z)[q].
  virtual absl::Status Scan(absl::Span<const float> queries, size_t n,
                            const ScanParams& params, std::vector<DeviceHit>* hits,
                            std::vector<double>* log_z) = 0;
  // Approximate top-k over the members of the `leaves` leaves with the best
  // upper bounds per query. Unordered, as Scan. FAILED_PRECONDITION before
  // SetLeaves.
  virtual absl::Status Beam(absl::Span<const float> queries, size_t n,
                            int leaves, int k, std::vector<DeviceHit>* hits) = 0;

  struct ProposeParams {
    float inv_tau = 20.0f;
    uint64_t seed = 0;
    // Per query q: draws[q] draws, numbered first_draw[q], first_draw[q] + 1,
    // ... (a draw's number and query_ids[q] pick its random numbers, so a
    // later round continues a query's stream); query_ids empty: q.
    std::vector<uint32_t> draws;
    std::vector<uint64_t> first_draw;
    std::vector<uint32_t> query_ids;
    // Per query, the rows that are not eligible (as ScanParams).
    std::vector<uint32_t> exclude_offsets, exclude_rows;
  };
  // Proposal sampling over the leaves (the tree's default SAMPLE): a draw
  // picks leaf f with probability proportional to n_f exp(<q, c_f>/tau +
  // |q|^2 spread_f / (2 dim tau^2)), n_f counting the eligible targets, then
  // a target from the exact softmax over the leaf's eligible targets. Query
  // q's draws go to (*draws)[o_q, o_q + p.draws[q]) in draw order, o_q the
  // sum of the draws before q; DeviceHit::key is log q(y) = log P(f) +
  // s/tau - log Z_f. INVALID_ARGUMENT when a query's weights overflow
  // float, FAILED_PRECONDITION before SetLeaves.
  virtual absl::Status Propose(absl::Span<const float> queries, size_t n,
                               const ProposeParams& p, std::vector<DeviceHit>* draws) = 0;

  // out = x + k(x, L) C for the n rows of x (n x dim, host memory), on the
  // device: two float32 GEMMs per chunk of rows (the drift update's bulk).
  virtual absl::Status CorrectRows(const DeviceDriftModel& model, const float* x, size_t n,
                                   float* out) = 0;

  // Device bytes held (vectors, leaves, scratch).
  virtual size_t MemoryBytes() const = 0;
  // Rows scored and leaves visited per query by the last call.
  virtual double LastVisitsPerQuery() const = 0;
  // Benchmarks: with profiling on, the stream is synchronized after every
  // phase of a call; LastProfile() lists the phases' times of the last call
  // and LastGemmSeconds() the scoring GEMMs' part.
  virtual void set_profiling(bool on) = 0;
  // The fused scan: top-k Scans (no Gumbel keys, no log Z) of float16 /
  // bfloat16 with dim <= 256 and at least 64 queries score with a
  // tensor-core kernel whose epilogue keeps only the scores that reach each
  // query's bound, so the score matrix is never written. Off by default
  // until it has run on a GPU (issue #9); NEGMINE_CUDA_FUSED_SCAN=1 turns it
  // on for every mirror. LastFusedRedo(): queries of the last Scan whose
  // candidates overflowed and were scanned again unfused.
  virtual void set_fused_scan(bool on) = 0;
  virtual size_t LastFusedRedo() const = 0;
  virtual std::string LastProfile() const = 0;
  virtual double LastGemmSeconds() const = 0;
};

}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_DEVICE_MIRROR_H_
