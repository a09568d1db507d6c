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

// Sampling in units draws what the whole batch draws: each unit's queries
// keep the random streams of their positions in the call. Up to rounding: a
// unit's scoring and routing products sum in another order than the whole
// batch's, which moves log q in its last digits and can, rarely, flip a draw
// that lands within rounding of a boundary (at most 1% of the queries here;
// at this temperature some queries hold almost all their mass in a few
// targets, so their last distinct draw is such a case).
TEST(WorkUnitTest, SamplesInUnitsAreTheSamplesOfTheWholeBatch) {
  const std::vector<float> q = RandomVectors(kQueries, kDim, 4);
  std::vector<std::vector<uint64_t>> exclude(kQueries);
  for (size_t i = 0; i < kQueries; ++i) exclude[i] = {5 * (i % kTargets) + 1};
  struct Case {
    IndexKind kind;
    Sampler sampler;
    MineMode mode;
    bool with_replacement;
  };
  const Case cases[] = {
      {IndexKind::kExact, Sampler::kExact, MineMode::kSample, false},
      {IndexKind::kExact, Sampler::kExact, MineMode::kMixed, true},
      {IndexKind::kTree, Sampler::kProposal, MineMode::kSample, false},
      {IndexKind::kTree, Sampler::kProposal, MineMode::kMixed, true},
      {IndexKind::kTree, Sampler::kExact, MineMode::kSample, true},
  };
  for (const Case& c : cases) {
    auto index = Filled(c.kind);
    SearchParams whole{.mode = c.mode, .sampler = c.sampler, .k = 12, .temperature = 0.2f,
                       .num_hard = c.mode == MineMode::kMixed ? 4 : 0,
                       .with_replacement = c.with_replacement, .seed = 99,
                       .work_unit_queries = 0};
    absl::StatusOr<SearchResult> want = index->Search(q, exclude, whole);
    ASSERT_THAT(want.status(), IsOk());
    for (int unit : {7, 256}) {
      SearchParams p = whole;
      p.work_unit_queries = unit;
      absl::StatusOr<SearchResult> got = index->Search(q, exclude, p);
      ASSERT_THAT(got.status(), IsOk());
      ASSERT_EQ(got->queries.size(), kQueries);
      size_t differ = 0;
      for (size_t i = 0; i < kQueries; ++i) {
        const QueryResult& g = got->queries[i];
        const QueryResult& w = want->queries[i];
        EXPECT_EQ(g.num_top, w.num_top);
        if (g.ids != w.ids) {
          ++differ;
          continue;
        }
        ASSERT_EQ(g.log_q.size(), w.log_q.size());
        for (size_t j = 0; j < w.log_q.size(); ++j) EXPECT_NEAR(g.log_q[j], w.log_q[j], 1e-3);
      }
      EXPECT_LE(differ, kQueries / 100)
          << "unit " << unit << ", index " << static_cast<int>(c.kind) << ", sampler "
          << static_cast<int>(c.sampler) << ": draws that depend on the unit";
    }
  }
}

// A cancellation that comes during the batch stops it within a unit: the
// search polls between units, so the polls counted before CANCELLED are
// bounded by the batch's units, and a cancelled batch returns no results.
TEST(WorkUnitTest, ACancellationStopsTheBatchBetweenUnits) {
  const std::vector<float> q = RandomVectors(kQueries, kDim, 3);
  for (IndexKind kind : {IndexKind::kExact, IndexKind::kTree}) {
    for (MineMode mode : {MineMode::kTopK, MineMode::kSample}) {
      auto index = Filled(kind);
      auto polls = std::make_shared<std::atomic<int>>(0);
      SearchParams p{.mode = mode, .k = 5, .temperature = 0.2f, .work_unit_queries = 100};
      // Cancelled from the 3rd poll on (the call's deadline passing then).
      p.cancelled = [polls] { return polls->fetch_add(1) >= 2; };
      EXPECT_THAT(index->Search(q, {}, p).status(),
                  StatusIs(absl::StatusCode::kCancelled, HasSubstr("cancelled")));
      // At most the polls of the first units ran (not one per query of all 7).
      EXPECT_LE(polls->load(), 2 + 100 + 2) << "the batch ran on after its cancellation";
    }
  }
}

// Each work unit takes its turn (SearchParams::turns): one Acquire and one
// Release around every unit, never nested.
TEST(WorkUnitTest, EveryUnitTakesATurn) {
  struct Recorder : UnitTurns {
    std::vector<char> calls;
    void Acquire() override { calls.push_back('A'); }
    void Release() override { calls.push_back('R'); }
  };
  const std::vector<float> q = RandomVectors(kQueries, kDim, 4);
  for (IndexKind kind : {IndexKind::kExact, IndexKind::kTree}) {
    auto index = Filled(kind);
    Recorder turns;
    SearchParams p{.k = 5, .work_unit_queries = 100};
    p.turns = &turns;
    ASSERT_THAT(index->Search(q, {}, p).status(), IsOk());
    std::vector<char> want;
    for (size_t u = 0; u < (kQueries + 99) / 100; ++u) {
      want.push_back('A');
      want.push_back('R');
    }
    EXPECT_EQ(turns.calls, want);
  }
}

}  // namespace
}  // namespace negmine
