// negmine-filters-bench: what the mining controls cost against plain mining,
// on the tree index, in one process and one run.
//
// The data are the drift-bench generator's (--preset hard by default: 1024
// overlapping clusters), or the caller's own embeddings (--targets and
// --queries, .npy). Each query's positive is its nearest target (found
// first, outside the timings), as for a trainer whose pairs are close.
// Every row mines the whole query batch once per round, the rows
// interleaved, for --repeats rounds; the median is reported, and the ratio
// is against the plain row of the same mode.
//
//   negmine-filters-bench --n=1000000 --dim=128 --queries=1024 --k=64
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <memory>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/npy.h"
#include "core/index.h"
#include "core/store/drift_bench.h"

ABSL_FLAG(uint64_t, n, 1000000, "targets (the generator; ignored with --targets)");
ABSL_FLAG(int, dim, 128, "embedding dimension (the generator)");
ABSL_FLAG(uint64_t, queries, 1024, "queries (the generator)");
ABSL_FLAG(std::string, preset, "hard", "the generator's preset: easy or hard");
ABSL_FLAG(std::string, targets, "", "a .npy of targets (rows L2-normalized by the index: cosine)");
ABSL_FLAG(std::string, query_file, "", "a .npy of queries, with --targets");
ABSL_FLAG(int, k, 64, "negatives per query");
ABSL_FLAG(int, repeats, 3, "timed runs per row (the median is reported)");
ABSL_FLAG(uint64_t, seed, 1, "generator seed");
ABSL_FLAG(std::string, only, "", "run only the rows whose name contains this (and their plain rows)");

namespace negmine {
namespace {

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "negmine-filters-bench: %s\n", message.c_str());
  std::exit(2);
}

std::vector<float> Load(const std::string& path, int* dim) {
  absl::StatusOr<client::Array<float>> a = client::LoadNpyFloat(path);
  if (!a.ok()) Die(absl::StrCat(path, ": ", a.status().message()));
  *dim = static_cast<int>(a->cols);
  return std::move(a->data);
}

struct Row {
  std::string name;
  MineMode mode;
  std::function<void(SearchParams*)> set;
};

int Main() {
  const int k = absl::GetFlag(FLAGS_k);
  int dim = absl::GetFlag(FLAGS_dim);
  std::vector<float> targets, queries;
  std::string data;
  if (!absl::GetFlag(FLAGS_targets).empty()) {
    int qdim = 0;
    targets = Load(absl::GetFlag(FLAGS_targets), &dim);
    queries = Load(absl::GetFlag(FLAGS_query_file), &qdim);
    if (qdim != dim) Die("--targets and --query_file differ in dim");
    data = absl::GetFlag(FLAGS_targets);
  } else {
    absl::StatusOr<DriftBenchPreset> preset = ParseDriftBenchPreset(absl::GetFlag(FLAGS_preset));
    if (!preset.ok()) Die(std::string(preset.status().message()));
    DriftBenchConfig c = DriftBenchPresetConfig(*preset);
    c.num_targets = absl::GetFlag(FLAGS_n);
    c.num_queries = absl::GetFlag(FLAGS_queries);
    c.dim = dim;
    c.seed = absl::GetFlag(FLAGS_seed);
    DriftBench bench(c);
    targets = bench.Targets(0);
    queries = bench.Queries(0);
    data = absl::StrCat("drift-bench ", absl::GetFlag(FLAGS_preset), ", seed ", c.seed);
  }
  const size_t n = targets.size() / dim, nq = queries.size() / dim;
  IndexOptions o{.dim = dim, .metric = Metric::kCosine, .backend = Backend::kCpu,
                 .kind = IndexKind::kTree};
  o.tree.background_rebuild = false;
  std::unique_ptr<Index> index = *CreateIndex(o);
  std::vector<uint64_t> ids(n);
  for (size_t i = 0; i < n; ++i) ids[i] = i;
  if (absl::Status s = index->Upsert(ids, targets, 0); !s.ok()) Die(std::string(s.message()));
  targets.clear();
  targets.shrink_to_fit();

  // Each query's positive: its nearest target.
  absl::StatusOr<SearchResult> nearest = index->Search(queries, {}, SearchParams{.k = 1});
  if (!nearest.ok()) Die(std::string(nearest.status().message()));
  std::vector<std::vector<uint64_t>> positives(nq);
  for (size_t i = 0; i < nq; ++i) positives[i] = {nearest->queries[i].ids[0]};

  std::vector<Row> rows = {
      {"top_k", MineMode::kTopK, nullptr},
      {"top_k + positives (excluded)", MineMode::kTopK, [](SearchParams*) {}},
      {"top_k + relative_margin 0.05", MineMode::kTopK,
       [](SearchParams* p) { p->filters.relative_margin = 0.05f; }},
      {"top_k + absolute_margin 0.02", MineMode::kTopK,
       [](SearchParams* p) { p->filters.absolute_margin = 0.02f; }},
      {"top_k + max_score 0.8, min_score 0.2", MineMode::kTopK,
       [](SearchParams* p) {
         p->filters.max_score = 0.8f;
         p->filters.min_score = 0.2f;
       }},
      {"top_k + dedupe 0.98", MineMode::kTopK,
       [](SearchParams* p) { p->filters.dedupe_cosine = 0.98f; }},
      {"sample", MineMode::kSample, nullptr},
      {"sample + relative_margin 0.05", MineMode::kSample,
       [](SearchParams* p) { p->filters.relative_margin = 0.05f; }},
      {"sample SimANS (K = 100)", MineMode::kSample,
       [](SearchParams* p) { p->distribution = SampleDistribution::kSimans; }},
      {"mixed", MineMode::kMixed, nullptr},
      {"mixed + relative_margin 0.05", MineMode::kMixed,
       [](SearchParams* p) { p->filters.relative_margin = 0.05f; }},
  };
  std::printf("negmine-filters-bench: %zu targets x %d (%s), %zu queries, k = %d, tree index, "
              "cosine; median of %d runs\n\n",
              n, dim, data.c_str(), nq, k, absl::GetFlag(FLAGS_repeats));
  std::vector<Row> kept;
  for (const Row& row : rows) {
    if (!row.set || row.name.find(absl::GetFlag(FLAGS_only)) != std::string::npos) {
      kept.push_back(row);
    }
  }
  rows = std::move(kept);
  // The rows interleaved, round after round, so that a change in the
  // machine's load falls on every row alike.
  std::vector<SearchParams> params(rows.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    SearchParams& p = params[r];
    p = SearchParams{.mode = rows[r].mode, .k = k, .temperature = 0.05f,
                     .num_hard = rows[r].mode == MineMode::kMixed ? k / 4 : 0, .seed = 7};
    p.simans.candidates = std::max(100, k);
    if (rows[r].set) {
      p.positives = positives;
      rows[r].set(&p);
    }
  }
  std::vector<std::vector<double>> times(rows.size());
  for (int round = -1; round < absl::GetFlag(FLAGS_repeats); ++round) {  // -1: warm-up
    for (size_t r = 0; r < rows.size(); ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      absl::StatusOr<SearchResult> result = index->Search(queries, {}, params[r]);
      times[r].push_back(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      if (!result.ok()) Die(absl::StrCat(rows[r].name, ": ", result.status().message()));
      if (round < 0) times[r].clear();
    }
  }
  std::printf("| mining | seconds | queries/s | vs plain |\n|---|---:|---:|---:|\n");
  double plain = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    std::sort(times[r].begin(), times[r].end());
    const double t = times[r][times[r].size() / 2];
    if (!rows[r].set) plain = t;
    std::printf("| %s | %.3f | %.0f | %.2fx |\n", rows[r].name.c_str(), t, nq / t, t / plain);
  }
  return 0;
}

}  // namespace
}  // namespace negmine

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return negmine::Main();
}
