// Micro-batching (server/coalescer.h) against the index alone: merged
// requests get the results they would get by themselves (ids equal, scores to
// float rounding), each keeps
// its own status, and sampling requests are never merged. Batches are
// released when full (the latency budget is set far away), so the batch
// counts do not depend on timing.
#include "server/coalescer.h"

#include <cmath>
#include <limits>
#include <thread>

#include "core/index.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine::server {
namespace {

using ::negmine::testing::IsOk;
using ::negmine::testing::StatusIs;

constexpr int kDim = 16;

std::unique_ptr<Index> MakeIndex() {
  absl::StatusOr<std::unique_ptr<Index>> index =
      CreateIndex({.dim = kDim, .backend = Backend::kCpu});
  EXPECT_THAT(index, IsOk());
  std::vector<float> v = testing::RandomVectors(2000, kDim, 1);
  std::vector<uint64_t> ids(2000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = 10 * i + 3;
  EXPECT_THAT((*index)->Upsert(ids, v, 0), IsOk());
  return *std::move(index);
}

void ExpectSame(const SearchResult& a, const SearchResult& b) {
  ASSERT_EQ(a.queries.size(), b.queries.size());
  EXPECT_EQ(a.index_version, b.index_version);
  for (size_t i = 0; i < a.queries.size(); ++i) {
    EXPECT_EQ(a.queries[i].ids, b.queries[i].ids) << "query " << i;
    ASSERT_EQ(a.queries[i].scores.size(), b.queries[i].scores.size());
    // A GEMM's summation order depends on the batch's shape: scores agree
    // to float rounding.
    for (size_t j = 0; j < a.queries[i].scores.size(); ++j) {
      EXPECT_NEAR(a.queries[i].scores[j], b.queries[i].scores[j],
                  1e-5 * std::abs(b.queries[i].scores[j]) + 1e-6);
    }
  }
}

TEST(CoalescerTest, MergedRequestsGetTheirOwnExactResults) {
  std::unique_ptr<Index> index = MakeIndex();
  // 8 requests of 1..3 queries (16 in all), some with exclusions.
  const int kRequests = 8;
  std::vector<std::vector<float>> queries(kRequests);
  std::vector<std::vector<std::vector<uint64_t>>> exclude(kRequests);
  size_t total = 0;
  for (int r = 0; r < kRequests; ++r) {
    const size_t n = 1 + r % 3;
    queries[r] = testing::RandomVectors(n, kDim, 100 + r);
    if (r % 2 == 0) exclude[r].assign(n, {3, 13, 23});
    total += n;
  }
  SearchCoalescer coalescer(index.get(),
                            {.max_queries = total, .max_delay = absl::Seconds(60)});
  const SearchParams params{.k = 7};
  std::vector<absl::StatusOr<SearchResult>> got(kRequests);
  std::vector<std::thread> threads;
  for (int r = 0; r < kRequests; ++r) {
    threads.emplace_back([&, r] { got[r] = coalescer.Search(queries[r], exclude[r], params); });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(coalescer.batches(), 1u) << "one batch, released when full";
  EXPECT_EQ(coalescer.merged_requests(), uint64_t{kRequests});
  for (int r = 0; r < kRequests; ++r) {
    ASSERT_THAT(got[r], IsOk());
    absl::StatusOr<SearchResult> alone = index->Search(queries[r], exclude[r], params);
    ASSERT_THAT(alone, IsOk());
    ExpectSame(*got[r], *alone);
  }
}

TEST(CoalescerTest, EachRequestKeepsItsOwnStatus) {
  std::unique_ptr<Index> index = MakeIndex();
  std::vector<float> good = testing::RandomVectors(2, kDim, 7);
  std::vector<float> bad = good;
  bad[3] = std::numeric_limits<float>::quiet_NaN();
  // A request with a NaN is refused alone, before joining any batch.
  SearchCoalescer coalescer(index.get(), {.max_queries = 4, .max_delay = absl::Seconds(60)});
  EXPECT_THAT(coalescer.Search(bad, {}, {.k = 3}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("queries")));
  EXPECT_EQ(coalescer.batches(), 0u);
  // Two requests of 2 queries fill a batch; the one whose caller went away
  // gets CANCELLED, the other its results.
  SearchParams cancelled{.k = 3};
  cancelled.cancelled = [] { return true; };
  absl::StatusOr<SearchResult> a, b;
  std::thread ta([&] { a = coalescer.Search(good, {}, cancelled); });
  std::thread tb([&] { b = coalescer.Search(good, {}, {.k = 3}); });
  ta.join();
  tb.join();
  EXPECT_EQ(coalescer.batches(), 1u);
  EXPECT_THAT(a, StatusIs(absl::StatusCode::kCancelled, ::testing::HasSubstr("cancelled")));
  ASSERT_THAT(b, IsOk());
  ExpectSame(*b, *index->Search(good, {}, {.k = 3}));
}

TEST(CoalescerTest, SamplingAndBigRequestsRunAlone) {
  std::unique_ptr<Index> index = MakeIndex();
  SearchCoalescer coalescer(index.get(), {.max_queries = 4, .max_delay = absl::Seconds(60)});
  std::vector<float> q = testing::RandomVectors(2, kDim, 9);
  const SearchParams sample{.mode = MineMode::kSample, .k = 4, .seed = 5};
  absl::StatusOr<SearchResult> r = coalescer.Search(q, {}, sample);
  ASSERT_THAT(r, IsOk());
  ExpectSame(*r, *index->Search(q, {}, sample));  // same seed, same draws
  std::vector<float> big = testing::RandomVectors(4, kDim, 10);
  ASSERT_THAT(coalescer.Search(big, {}, {.k = 2}), IsOk());
  EXPECT_EQ(coalescer.batches(), 0u) << "neither waited for a batch";
}

}  // namespace
}  // namespace negmine::server
