// libFuzzer target: restoring an index from arbitrary snapshot bytes never
// crashes; it either succeeds into a consistent index (its tree's invariants
// hold, searches answer) or returns DATA_LOSS and leaves the index as it was.
// Seed corpus: tests/fuzz/corpus/snapshot/ (index parts of real snapshots
// of a 4-d cosine tree collection).
#include <cstdint>
#include <string_view>

#include "core/index.h"
#include "core/tree/tree_index.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace negmine;
  IndexOptions o{.dim = 4, .metric = Metric::kCosine, .backend = Backend::kCpu,
                 .kind = IndexKind::kTree};
  o.tree.background_rebuild = false;
  std::unique_ptr<Index> index = CreateIndex(o).value();
  const std::vector<float> x = {1, 0, 0, 0, 0, 1, 0, 0};
  if (!index->Upsert({1, 2}, x, 0).ok()) __builtin_trap();
  const absl::Status s =
      index->Restore(std::string_view(reinterpret_cast<const char*>(data), size));
  auto* tree = static_cast<TreeIndex*>(index.get());
  if (!tree->CheckInvariants().ok()) __builtin_trap();
  if (!s.ok()) {
    if (s.code() != absl::StatusCode::kDataLoss || index->Stats().num_targets != 2) __builtin_trap();
    return 0;
  }
  const std::vector<float> q = {0.5f, 0.5f, 0.1f, 0.2f};
  if (index->Stats().num_targets > 0) {
    SearchParams p{.k = 1};
    if (!index->Search(q, {}, p).ok()) __builtin_trap();
  }
  return 0;
}
