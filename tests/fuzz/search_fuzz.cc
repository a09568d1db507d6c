// libFuzzer target: request validation and search on arbitrary queries and
// parameters never crash; bad input is an error status, good input an answer
// of the promised shape. Built and run like wal_fuzz.cc; seed corpus
// tests/fuzz/corpus/search/.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "core/index.h"

namespace {

template <typename T>
T Take(const uint8_t*& p, size_t& n) {
  T v{};
  const size_t k = std::min(sizeof(T), n);
  if (k > 0) std::memcpy(&v, p, k);
  p += k;
  n -= k;
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace negmine;
  constexpr int kDim = 4;
  static std::unique_ptr<Index> indexes[2] = {};
  if (!indexes[0]) {
    for (int kind = 0; kind < 2; ++kind) {
      IndexOptions o{.dim = kDim, .metric = kind ? Metric::kCosine : Metric::kInnerProduct,
                     .backend = Backend::kCpu, .kind = kind ? IndexKind::kTree : IndexKind::kExact};
      o.tree.leaf_size = 4;
      o.tree.background_rebuild = false;
      indexes[kind] = CreateIndex(o).value();
      std::vector<uint64_t> ids(64);
      std::vector<float> x(64 * kDim);
      for (int i = 0; i < 64; ++i) {
        ids[i] = 1000 + i;
        for (int j = 0; j < kDim; ++j) x[i * kDim + j] = std::sin(0.7f * i + 1.3f * j) + 0.1f;
      }
      if (!indexes[kind]->Upsert(ids, x, 0).ok()) __builtin_trap();
    }
  }
  const uint8_t* p = data;
  size_t n = size;
  const uint8_t flags = Take<uint8_t>(p, n);
  SearchParams sp;
  sp.mode = static_cast<MineMode>(flags % 3);
  sp.sampler = (flags & 4) ? Sampler::kExact : Sampler::kProposal;
  sp.with_replacement = flags & 8;
  sp.approximate = flags & 16;
  sp.want_log_z = flags & 32;
  sp.k = Take<int8_t>(p, n);
  sp.num_hard = Take<int8_t>(p, n);
  sp.rank_offset = Take<int8_t>(p, n);
  sp.beam_width = Take<int8_t>(p, n);
  sp.temperature = Take<float>(p, n);
  sp.log_z_width = Take<float>(p, n);
  sp.seed = Take<uint8_t>(p, n);
  std::vector<float> queries(std::min<size_t>(n / sizeof(float), 8 * kDim + 1));
  if (!queries.empty()) std::memcpy(queries.data(), p, queries.size() * sizeof(float));
  std::vector<std::vector<uint64_t>> exclude;
  if ((flags & 64) && queries.size() % kDim == 0 && !queries.empty()) {
    exclude.assign(queries.size() / kDim, {1000, 1001, 5});
  }
  for (auto& index : indexes) {
    absl::StatusOr<SearchResult> r = index->Search(queries, exclude, sp);
    if (!r.ok()) continue;
    if (r->queries.size() != queries.size() / kDim) __builtin_trap();
    for (const QueryResult& q : r->queries) {
      if (q.ids.size() > static_cast<size_t>(sp.k) || q.ids.size() != q.scores.size() ||
          q.ids.size() != q.log_q.size()) {
        __builtin_trap();
      }
    }
  }
  return 0;
}
