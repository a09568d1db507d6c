// ChangedRuns: which parts of an array changed since its last upload, so that
// the device mirror copies only those (DESIGN.md: maintenance runs on the
// host, and the changed ranges go to the device). Host code, no CUDA: the
// CPU tests check it.
#ifndef NEGMINE_CORE_CUDA_CHANGED_RUNS_H_
#define NEGMINE_CORE_CUDA_CHANGED_RUNS_H_

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/types/span.h"

namespace negmine {

// The runs [begin, end) of `now` that differ from `before`, compared in
// blocks of `block` elements: a block that differs anywhere is one run, the
// part of `now` beyond `before` is one run, and adjacent runs are merged.
// The runs are in order and cover every element that differs.
template <typename V>
std::vector<std::pair<size_t, size_t>> ChangedRuns(absl::Span<const V> before,
                                                   absl::Span<const V> now, size_t block) {
  std::vector<std::pair<size_t, size_t>> runs;
  auto add = [&](size_t begin, size_t end) {
    if (!runs.empty() && runs.back().second == begin) {
      runs.back().second = end;
    } else {
      runs.emplace_back(begin, end);
    }
  };
  const size_t common = std::min(before.size(), now.size());
  for (size_t b = 0; b < common; b += block) {
    const size_t e = std::min(common, b + block);
    if (std::memcmp(before.data() + b, now.data() + b, (e - b) * sizeof(V)) != 0) add(b, e);
  }
  if (now.size() > common) add(common, now.size());
  return runs;
}

}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_CHANGED_RUNS_H_
