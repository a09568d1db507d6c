#include "bench/peers.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <thread>

#include <faiss/IndexFlat.h>
#include <faiss/IndexHNSW.h>
#include <faiss/IndexIVFFlat.h>
#include <faiss/impl/IDSelector.h>
#include <hnswlib/hnswlib.h>

#include "core/index.h"

namespace negmine::bench {

void ParallelFor(size_t n, int threads,
                 const std::function<void(size_t, size_t)>& fn) {
  const size_t parts = std::max(1, std::min<int>(threads, static_cast<int>(n)));
  std::vector<std::thread> pool;
  for (size_t p = 0; p < parts; ++p) {
    const size_t begin = n * p / parts, end = n * (p + 1) / parts;
    pool.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  for (auto& t : pool) t.join();
}

namespace {

// ef values for HNSW: k, 2k, ... up to 16k (ef < k is clamped to k anyway).
std::vector<int> EfSweep(int k) {
  std::vector<int> v;
  for (int ef = k; ef <= 16 * k; ef *= 2) v.push_back(ef);
  return v;
}

// A negmine index in process: the exact (brute-force) index, or the tree with
// exact top-k, or the tree's beam search swept over its width in leaves. A
// batch is split across `threads` concurrent Search calls (as the server
// does for concurrent requests).
class NegmineIndex final : public BenchIndex {
 public:
  enum Kind { kExact, kTreeExact, kTreeBeam };
  NegmineIndex(Kind kind, int threads, Metric metric = Metric::kInnerProduct,
               IndexOptions::Drift drift = {})
      : kind_(kind), threads_(threads), metric_(metric), drift_(drift) {}
  std::string name() const override {
    return kind_ == kExact ? "negmine-exact" : kind_ == kTreeExact ? "negmine-tree-exact" : "negmine-tree";
  }
  std::string knob_name() const override { return kind_ == kTreeBeam ? "beam" : ""; }
  std::vector<int> knobs(int) const override {
    if (kind_ != kTreeBeam) return {0};
    return {4, 16, 64, 128, 256, 512, 1024};
  }
  void Build(const float* x, size_t n, int dim) override {
    dim_ = dim;
    IndexOptions o{.dim = dim, .metric = metric_, .backend = Backend::kCpu,
                   .kind = kind_ == kExact ? IndexKind::kExact : IndexKind::kTree,
                   .initial_capacity = n};
    o.tree.background_rebuild = false;
    o.drift = drift_;
    index_ = CreateIndex(o).value();
    std::vector<uint64_t> ids(n);
    std::iota(ids.begin(), ids.end(), 0);
    Check(index_->Upsert(ids, {x, n * dim}, 0));
  }
  std::vector<int64_t> Search(const float* q, size_t nq, int k, int knob) override {
    std::vector<int64_t> out(nq * k, -1);
    ParallelFor(nq, threads_, [&](size_t b, size_t e) {
      auto r = index_->Search({q + b * dim_, (e - b) * dim_}, {},
                              {.mode = MineMode::kTopK, .k = k,
                               .approximate = kind_ == kTreeBeam, .beam_width = knob});
      Check(r.status());
      for (size_t i = b; i < e; ++i) {
        const auto& ids = r->queries[i - b].ids;
        std::copy(ids.begin(), ids.end(), out.begin() + i * k);
      }
    });
    return out;
  }
  bool Update(const std::vector<int64_t>& ids, const float* x) override {
    std::vector<uint64_t> u(ids.begin(), ids.end());
    Check(index_->Upsert(u, {x, u.size() * dim_}, 1));
    return true;
  }
  size_t MemoryBytes() const override { return index_->Stats().memory_bytes; }
  Index* core() override { return index_.get(); }

 private:
  static void Check(const absl::Status& s) {
    if (!s.ok()) {
      std::fprintf(stderr, "negmine: %s\n", s.ToString().c_str());
      std::abort();
    }
  }
  Kind kind_;
  int threads_;
  Metric metric_;
  IndexOptions::Drift drift_;
  int dim_ = 0;
  std::unique_ptr<Index> index_;
};

// Shared search for FAISS indexes.
std::vector<int64_t> FaissSearch(faiss::Index& index, const float* q,
                                 size_t nq, int k,
                                 const faiss::SearchParameters* params) {
  std::vector<float> d(nq * k);
  std::vector<faiss::Index::idx_t> ids(nq * k);
  index.search(nq, q, k, d.data(), ids.data(), params);
  return std::vector<int64_t>(ids.begin(), ids.end());
}

class FaissFlat final : public BenchIndex {
 public:
  std::string name() const override { return "faiss-flat"; }
  void Build(const float* x, size_t n, int dim) override {
    index_ = std::make_unique<faiss::IndexFlatIP>(dim);
    index_->add(n, x);
  }
  std::vector<int64_t> Search(const float* q, size_t nq, int k, int) override {
    return FaissSearch(*index_, q, nq, k, nullptr);
  }
  // Flat storage is a plain array: overwrite the rows in place.
  bool Update(const std::vector<int64_t>& ids, const float* x) override {
    float* xb = index_->get_xb();
    const int d = index_->d;
    for (size_t i = 0; i < ids.size(); ++i) {
      std::memcpy(xb + ids[i] * d, x + i * d, d * sizeof(float));
    }
    return true;
  }
  size_t MemoryBytes() const override {
    return index_->codes.size();
  }

 private:
  std::unique_ptr<faiss::IndexFlatIP> index_;
};

class FaissIvfFlat final : public BenchIndex {
 public:
  explicit FaissIvfFlat(const PeerOptions& o) : o_(o) {}
  std::string name() const override { return "faiss-ivfflat"; }
  std::string knob_name() const override { return "nprobe"; }
  std::vector<int> knobs(int) const override {
    std::vector<int> v;
    // Powers of two up to the number of lists: on hard data recall@k 0.95
    // can need more than 256 (the sweep stops once recall reaches 0.999).
    const int nlist = nlist_ > 0 ? nlist_ : o_.ivf_nlist;
    for (int p = 1; p <= nlist; p *= 2) v.push_back(p);
    return v;
  }
  void Build(const float* x, size_t n, int dim) override {
    nlist_ = static_cast<int>(std::min<size_t>(o_.ivf_nlist, std::max<size_t>(1, n / 39)));
    quantizer_ = std::make_unique<faiss::IndexFlatIP>(dim);
    index_ = std::make_unique<faiss::IndexIVFFlat>(quantizer_.get(), dim, nlist_,
                                                   faiss::METRIC_INNER_PRODUCT);
    index_->train(n, x);
    index_->add(n, x);
  }
  std::vector<int64_t> Search(const float* q, size_t nq, int k, int knob) override {
    faiss::SearchParametersIVF p;
    p.nprobe = std::min(knob, nlist_);
    return FaissSearch(*index_, q, nq, k, &p);
  }
  // IVF lists support removal by id: remove, then add to the new lists.
  bool Update(const std::vector<int64_t>& ids, const float* x) override {
    std::vector<faiss::Index::idx_t> f(ids.begin(), ids.end());
    faiss::IDSelectorBatch sel(f.size(), f.data());
    index_->remove_ids(sel);
    index_->add_with_ids(f.size(), x, f.data());
    return true;
  }
  size_t MemoryBytes() const override {
    return index_->ntotal * (index_->code_size + sizeof(faiss::Index::idx_t)) +
           size_t{static_cast<size_t>(nlist_)} * index_->d * sizeof(float);
  }

 private:
  PeerOptions o_;
  int nlist_ = 0;
  std::unique_ptr<faiss::IndexFlatIP> quantizer_;
  std::unique_ptr<faiss::IndexIVFFlat> index_;
};

class FaissHnsw final : public BenchIndex {
 public:
  explicit FaissHnsw(const PeerOptions& o) : o_(o) {}
  std::string name() const override { return "faiss-hnsw"; }
  std::string knob_name() const override { return "efSearch"; }
  std::vector<int> knobs(int k) const override { return EfSweep(k); }
  void Build(const float* x, size_t n, int dim) override {
    index_ = std::make_unique<faiss::IndexHNSWFlat>(dim, o_.hnsw_m,
                                                    faiss::METRIC_INNER_PRODUCT);
    index_->hnsw.efConstruction = o_.hnsw_ef_construction;
    index_->add(n, x);
  }
  std::vector<int64_t> Search(const float* q, size_t nq, int k, int knob) override {
    // Set on the index: FAISS 1.7.3's HNSW search reads hnsw.efSearch.
    index_->hnsw.efSearch = std::max(knob, k);
    return FaissSearch(*index_, q, nq, k, nullptr);
  }
  // FAISS HNSW has no removal or in-place update: the caller rebuilds.
  bool Update(const std::vector<int64_t>&, const float*) override { return false; }
  size_t MemoryBytes() const override {
    return index_->ntotal * (index_->d * sizeof(float)) +
           index_->hnsw.neighbors.size() * sizeof(faiss::HNSW::storage_idx_t) +
           index_->hnsw.offsets.size() * sizeof(size_t) + index_->hnsw.levels.size() * 4;
  }

 private:
  PeerOptions o_;
  std::unique_ptr<faiss::IndexHNSWFlat> index_;
};

class Hnswlib final : public BenchIndex {
 public:
  explicit Hnswlib(const PeerOptions& o) : o_(o) {}
  std::string name() const override { return "hnswlib"; }
  std::string knob_name() const override { return "ef"; }
  std::vector<int> knobs(int k) const override { return EfSweep(k); }
  void Build(const float* x, size_t n, int dim) override {
    dim_ = dim;
    space_ = std::make_unique<hnswlib::InnerProductSpace>(dim);
    index_ = std::make_unique<hnswlib::HierarchicalNSW<float>>(
        space_.get(), n, o_.hnsw_m, o_.hnsw_ef_construction);
    // hnswlib's M means what FAISS's does: M links per node on upper
    // layers, 2M on layer 0.
    index_->addPoint(x, 0);  // the entry point first, then in parallel
    ParallelFor(n - 1, o_.threads, [&](size_t b, size_t e) {
      for (size_t i = b + 1; i < e + 1; ++i) index_->addPoint(x + i * dim, i);
    });
  }
  std::vector<int64_t> Search(const float* q, size_t nq, int k, int knob) override {
    index_->setEf(std::max(knob, k));
    std::vector<int64_t> out(nq * k, -1);
    ParallelFor(nq, o_.threads, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) {
        auto pq = index_->searchKnn(q + i * dim_, k);
        for (int j = static_cast<int>(pq.size()) - 1; j >= 0; --j) {
          out[i * k + j] = static_cast<int64_t>(pq.top().second);
          pq.pop();
        }
      }
    });
    return out;
  }
  // hnswlib updates a known label in place (re-linking its neighbourhood).
  bool Update(const std::vector<int64_t>& ids, const float* x) override {
    ParallelFor(ids.size(), o_.threads, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) index_->addPoint(x + i * dim_, ids[i]);
    });
    return true;
  }
  size_t MemoryBytes() const override {
    return index_->max_elements_ * index_->size_data_per_element_ +
           index_->cur_element_count * index_->size_links_per_element_;
  }

 private:
  PeerOptions o_;
  int dim_ = 0;
  std::unique_ptr<hnswlib::InnerProductSpace> space_;
  std::unique_ptr<hnswlib::HierarchicalNSW<float>> index_;
};

}  // namespace

std::unique_ptr<BenchIndex> MakeNegmineExact(int threads) {
  return std::make_unique<NegmineIndex>(NegmineIndex::kExact, threads);
}
std::unique_ptr<BenchIndex> MakeNegmineTree(int threads, bool exact) {
  return std::make_unique<NegmineIndex>(
      exact ? NegmineIndex::kTreeExact : NegmineIndex::kTreeBeam, threads);
}
std::unique_ptr<BenchIndex> MakeNegmineDrift(int threads, int num_landmarks) {
  return std::make_unique<NegmineIndex>(NegmineIndex::kTreeExact, threads, Metric::kCosine,
                                        IndexOptions::Drift{.num_landmarks = num_landmarks});
}
std::unique_ptr<BenchIndex> MakeFaissFlat(const PeerOptions&) {
  return std::make_unique<FaissFlat>();
}
std::unique_ptr<BenchIndex> MakeFaissIvfFlat(const PeerOptions& o) {
  return std::make_unique<FaissIvfFlat>(o);
}
std::unique_ptr<BenchIndex> MakeFaissHnsw(const PeerOptions& o) {
  return std::make_unique<FaissHnsw>(o);
}
std::unique_ptr<BenchIndex> MakeHnswlib(const PeerOptions& o) {
  return std::make_unique<Hnswlib>(o);
}

}  // namespace negmine::bench
