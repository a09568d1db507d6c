// Top-k searches in work units (SearchParams::work_unit_queries): the
// results equal one search of the whole batch (the same ids, scores to
// 1e-4: the scoring GEMM rounds by batch shape), on both CPU indexes, and
// a cancellation stops the batch between units.
#include <atomic>
#include <memory>
#include <vector>

#include "core/index.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::IsOk;
using ::negmine::testing::RandomVectors;
using ::negmine::testing::StatusIs;
using ::testing::HasSubstr;

constexpr int kDim = 16;
constexpr size_t kTargets = 3000, kQueries = 700;

std::unique_ptr<Index> Filled(IndexKind kind) {
  auto index = CreateIndex({.dim = kDim, .metric = Metric::kInnerProduct,
                            .backend = Backend::kCpu, .kind = kind})
                   .value();
  std::vector<uint64_t> ids(kTargets);
  for (size_t i = 0; i < kTargets; ++i) ids[i] = 5 * i + 1;
  EXPECT_THAT(index->Upsert(ids, RandomVectors(kTargets, kDim, 1), 0), IsOk());
  return index;
}

TEST(WorkUnitTest, UnitsGiveTheResultsOfTheWholeBatch) {
  const std::vector<float> q = RandomVectors(kQueries, kDim, 2);
  std::vector<std::vector<uint64_t>> exclude(kQueries);
  for (size_t i = 0; i < kQueries; ++i) exclude[i] = {5 * (i % kTargets) + 1, 16};
  for (IndexKind kind : {IndexKind::kExact, IndexKind::kTree}) {
    auto index = Filled(kind);
    for (bool approximate : {false, true}) {
      SearchParams whole{.k = 12, .approximate = approximate, .work_unit_queries = 0};
      absl::StatusOr<SearchResult> want = index->Search(q, exclude, whole);
      ASSERT_THAT(want.status(), IsOk());
      for (int unit : {1, 7, 256, 699}) {
        SearchParams p = whole;
        p.work_unit_queries = unit;
        absl::StatusOr<SearchResult> got = index->Search(q, exclude, p);
        ASSERT_THAT(got.status(), IsOk());
        ASSERT_EQ(got->queries.size(), kQueries);
        EXPECT_EQ(got->index_version, want->index_version);
        for (size_t i = 0; i < kQueries; ++i) {
          EXPECT_EQ(got->queries[i].ids, want->queries[i].ids) << "unit " << unit << " query " << i;
          // Scores up to rounding: the scoring GEMM's summation order
          // depends on the batch's shape.
          ASSERT_EQ(got->queries[i].scores.size(), want->queries[i].scores.size());
          for (size_t j = 0; j < want->queries[i].scores.size(); ++j) {
            EXPECT_NEAR(got->queries[i].scores[j], want->queries[i].scores[j], 1e-4);
          }
          EXPECT_EQ(got->queries[i].num_eligible, want->queries[i].num_eligible);
        }
      }
    }
  }
}

// A cancellation that comes during the batch stops it within a unit: the
// search polls between units, so the polls counted before CANCELLED are
// bounded by the batch's units, and a cancelled batch returns no results.
TEST(WorkUnitTest, ACancellationStopsTheBatchBetweenUnits) {
  const std::vector<float> q = RandomVectors(kQueries, kDim, 3);
  for (IndexKind kind : {IndexKind::kExact, IndexKind::kTree}) {
    auto index = Filled(kind);
    auto polls = std::make_shared<std::atomic<int>>(0);
    SearchParams p{.k = 5, .work_unit_queries = 100};
    // Cancelled from the 3rd poll on (the call's deadline passing then).
    p.cancelled = [polls] { return polls->fetch_add(1) >= 2; };
    EXPECT_THAT(index->Search(q, {}, p).status(),
                StatusIs(absl::StatusCode::kCancelled, HasSubstr("cancelled")));
    // At most the polls of the first units ran (not one per query of all 7).
    EXPECT_LE(polls->load(), 2 + 100 + 2) << "the batch ran on after its cancellation";
  }
}

}  // namespace
}  // namespace negmine
