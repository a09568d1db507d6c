// The indexes the drift bench compares, behind one small interface: negmine's
// own indexes and its peers (FAISS Flat, IVF-Flat, HNSW; hnswlib), all on
// inner product over the same float32 vectors (row-major, n x dim).
//
// Thread safety: Build and Update are not concurrent with anything; Search
// uses `threads` threads internally.
#ifndef NEGMINE_BENCH_PEERS_H_
#define NEGMINE_BENCH_PEERS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/index.h"

namespace negmine::bench {

class BenchIndex {
 public:
  virtual ~BenchIndex() = default;
  virtual std::string name() const = 0;
  // The search knob's name ("nprobe", "ef", ...) and the values to sweep
  // for top-k (values below k are meaningless for HNSW's ef); a single 0 for
  // an exact index without a knob.
  virtual std::string knob_name() const { return ""; }
  virtual std::vector<int> knobs(int /*k*/) const { return {0}; }

  // Indexes n vectors with ids 0..n-1.
  virtual void Build(const float* x, size_t n, int dim) = 0;
  // Top-k ids of nq queries at `knob`, nq x k (row-major).
  virtual std::vector<int64_t> Search(const float* q, size_t nq, int k,
                                      int knob) = 0;
  // Replaces the vectors of `ids` (re-encoded targets). Returns false when
  // the index cannot update in place, so the caller rebuilds it instead.
  virtual bool Update(const std::vector<int64_t>& ids, const float* x) = 0;
  // Bytes the index holds, by its own account; 0 if it cannot say.
  virtual size_t MemoryBytes() const { return 0; }
  // negmine's indexes: the core index (drift updates, scored vectors).
  virtual Index* core() { return nullptr; }
};

struct PeerOptions {
  int threads = 2;
  int ivf_nlist = 1024;
  int hnsw_m = 16;
  int hnsw_ef_construction = 40;
};

std::unique_ptr<BenchIndex> MakeNegmineExact(int threads);
// The tree index: exact top-k, or (exact = false) beam search over its knob.
std::unique_ptr<BenchIndex> MakeNegmineTree(int threads, bool exact);
// The tree index (exact top-k) on cosine, with drift correction over
// `num_landmarks` landmarks, for the drift figures.
std::unique_ptr<BenchIndex> MakeNegmineDrift(int threads, int num_landmarks);
std::unique_ptr<BenchIndex> MakeFaissFlat(const PeerOptions& o);
std::unique_ptr<BenchIndex> MakeFaissIvfFlat(const PeerOptions& o);
std::unique_ptr<BenchIndex> MakeFaissHnsw(const PeerOptions& o);
std::unique_ptr<BenchIndex> MakeHnswlib(const PeerOptions& o);

// Runs fn(begin, end) over [0, n) split into `threads` contiguous parts.
void ParallelFor(size_t n, int threads,
                 const std::function<void(size_t, size_t)>& fn);

}  // namespace negmine::bench

#endif  // NEGMINE_BENCH_PEERS_H_
