// Micro-benchmarks of negmine's core paths, with Google Benchmark:
// exact top-k and sampling by batch size, upsert throughput, and the
// float16 decode of the wire.
//
//   build/bench/negmine-micro-bench --benchmark_filter=TopK
#include <numeric>
#include <vector>

#include "benchmark/benchmark.h"
#include "core/dtype.h"
#include "core/index.h"
#include "core/random.h"

namespace negmine {
namespace {

constexpr int kDim = 128;
constexpr size_t kTargets = 100000;

std::vector<float> Random(size_t n, uint64_t seed) {
  Rng rng(seed, 0);
  std::vector<float> v(n * kDim);
  for (float& x : v) x = static_cast<float>(rng.Normal());
  return v;
}

const Index& SharedIndex() {
  static const Index* index = [] {
    auto i = CreateIndex({.dim = kDim, .backend = Backend::kCpu}).value();
    std::vector<uint64_t> ids(kTargets);
    std::iota(ids.begin(), ids.end(), 0);
    if (!i->Upsert(ids, Random(kTargets, 1), 0).ok()) std::abort();
    return i.release();
  }();
  return *index;
}

void BM_ExactSearch(benchmark::State& state, MineMode mode) {
  const Index& index = SharedIndex();
  const size_t batch = state.range(0);
  const auto q = Random(batch, 2);
  SearchParams p{.mode = mode, .k = 64, .temperature = 0.05f, .seed = 1};
  for (auto _ : state) {
    auto r = index.Search(q, {}, p);
    benchmark::DoNotOptimize(r);
  }
  state.SetItemsProcessed(state.iterations() * batch);
  state.counters["targets"] = kTargets;
}
BENCHMARK_CAPTURE(BM_ExactSearch, TopK, MineMode::kTopK)->Arg(1)->Arg(64)->Arg(1024);
BENCHMARK_CAPTURE(BM_ExactSearch, Sample, MineMode::kSample)->Arg(1)->Arg(64)->Arg(1024);

void BM_Upsert(benchmark::State& state) {
  const size_t rows = state.range(0);
  const auto x = Random(rows, 3);
  std::vector<uint64_t> ids(rows);
  std::iota(ids.begin(), ids.end(), 0);
  auto index = CreateIndex({.dim = kDim, .backend = Backend::kCpu}).value();
  for (auto _ : state) {
    if (!index->Upsert(ids, x, 0).ok()) std::abort();
  }
  state.SetItemsProcessed(state.iterations() * rows);
}
BENCHMARK(BM_Upsert)->Arg(4096);

void BM_HalfDecode(benchmark::State& state) {
  std::vector<uint16_t> h(1 << 16);
  for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<uint16_t>(i);
  float sink = 0;
  for (auto _ : state) {
    for (uint16_t v : h) sink += HalfToFloat(v);
    benchmark::DoNotOptimize(sink);
  }
  state.SetItemsProcessed(state.iterations() * h.size());
}
BENCHMARK(BM_HalfDecode);

}  // namespace
}  // namespace negmine

BENCHMARK_MAIN();
