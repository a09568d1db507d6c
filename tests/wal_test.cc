// The write-ahead log: framing, torn tails, corruption, and the entry codec.
#include "core/persist/wal.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <set>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "core/persist/wal_entry.h"
#include "core/random.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/fault_env.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::IsOk;
using ::negmine::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

class WalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("negmine-wal-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    path_ = (dir_ / "wal.log").string();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Writes `payloads` as records of types 1, 2, 3, ...; returns the file.
  std::string Write(const std::vector<std::string>& payloads) {
    auto w = WalWriter::Open(path_, 0, {}).value();
    for (size_t i = 0; i < payloads.size(); ++i) {
      const std::string& p = payloads[i];
      auto end = w->Append(static_cast<uint8_t>(i + 1),
                           {reinterpret_cast<const uint8_t*>(p.data()), p.size()});
      EXPECT_THAT(end.status(), IsOk());
      EXPECT_THAT(w->Sync(*end), IsOk());
    }
    return ReadFile();
  }
  std::string ReadFile() {
    std::ifstream in(path_, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  void WriteFile(const std::string& bytes) {
    std::ofstream(path_, std::ios::binary | std::ios::trunc) << bytes;
  }

  std::filesystem::path dir_;
  std::string path_;
};

std::vector<std::string> Payloads(int n, uint64_t seed) {
  Rng rng(seed, 0);
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) {
    std::string p(rng.Below(300), '\0');
    for (char& c : p) c = static_cast<char>(rng.Below(256));
    out.push_back(p);
  }
  return out;
}

TEST(Crc32cTest, KnownValue) {
  // The CRC-32C check value (RFC 3720): "123456789" -> 0xE3069283.
  const std::string s = "123456789";
  EXPECT_EQ(Crc32c({reinterpret_cast<const uint8_t*>(s.data()), s.size()}), 0xE3069283u);
}

TEST_F(WalTest, RoundTripAndAppendAfterReopen) {
  const auto payloads = Payloads(20, 1);
  Write(payloads);
  absl::StatusOr<WalContents> c = ReadWal(path_);
  ASSERT_THAT(c.status(), IsOk());
  ASSERT_EQ(c->records.size(), payloads.size());
  for (size_t i = 0; i < payloads.size(); ++i) {
    EXPECT_EQ(c->records[i].type, i + 1);
    EXPECT_EQ(c->records[i].payload, payloads[i]);
  }
  EXPECT_EQ(c->torn_bytes, 0u);
  // Reopened at its end, it takes more records.
  auto w = WalWriter::Open(path_, c->valid_bytes, {}).value();
  const std::string more = "more";
  ASSERT_THAT(w->Append(9, {reinterpret_cast<const uint8_t*>(more.data()), more.size()}).status(),
              IsOk());
  w.reset();
  c = ReadWal(path_);
  ASSERT_THAT(c.status(), IsOk());
  ASSERT_EQ(c->records.size(), payloads.size() + 1);
  EXPECT_EQ(c->records.back().payload, "more");
  // A missing log is an empty one.
  std::filesystem::remove(path_);
  c = ReadWal(path_);
  ASSERT_THAT(c.status(), IsOk());
  EXPECT_TRUE(c->records.empty());
}

// A crash can stop a write at any byte: every cut of the file reads back as
// the records that were whole, plus a torn tail, and reopening cuts the tail.
TEST_F(WalTest, EveryCutIsATornTailOfWholeRecords) {
  const auto payloads = Payloads(6, 2);
  const std::string full = Write(payloads);
  std::vector<size_t> ends;
  {
    auto c = ReadWal(path_).value();
    for (const WalRecord& r : c.records) ends.push_back(r.offset);
    ends.push_back(full.size());
  }
  for (size_t cut = 0; cut <= full.size(); ++cut) {
    WriteFile(full.substr(0, cut));
    absl::StatusOr<WalContents> c = ReadWal(path_);
    ASSERT_THAT(c.status(), IsOk()) << "cut " << cut;
    size_t whole = 0;
    while (whole + 1 < ends.size() && ends[whole + 1] <= cut) ++whole;
    ASSERT_EQ(c->records.size(), whole) << "cut " << cut;
    EXPECT_EQ(c->valid_bytes, ends[whole]);
    EXPECT_EQ(c->torn_bytes, cut - ends[whole]);
  }
  WriteFile(full.substr(0, full.size() - 3));
  auto c = ReadWal(path_).value();
  WalWriter::Open(path_, c.valid_bytes, {}).value().reset();
  EXPECT_EQ(ReadFile(), full.substr(0, c.valid_bytes));
}

// A flipped byte anywhere in a log whose records are all wholly present is
// corruption: DATA_LOSS naming the offset, never wrong data, and never a
// quiet cut (the bytes of every record are there, so nothing was torn).
TEST_F(WalTest, FlippedBytesAreRefusedNeverLoaded) {
  const auto payloads = Payloads(5, 3);
  const std::string full = Write(payloads);
  Rng rng(4, 0);
  for (int trial = 0; trial < 200; ++trial) {
    std::string bad = full;
    const size_t at = rng.Below(bad.size());
    bad[at] = static_cast<char>(bad[at] ^ (1 + rng.Below(255)));
    WriteFile(bad);
    EXPECT_THAT(ReadWal(path_), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("offset")))
        << "flip at " << at;
  }
}

// The last record of an fsynced log, with one payload byte flipped: all of
// its bytes are present, so it is corruption (DATA_LOSS naming its offset),
// not a torn tail to cut. Only a record that runs past the end is torn.
TEST_F(WalTest, ACorruptLastRecordIsDataLossNotATornTail) {
  const auto payloads = Payloads(4, 5);
  std::string full = Write({payloads[0], payloads[1], std::string(200, 'x')});
  const uint64_t last = ReadWal(path_).value().records.back().offset;
  full[full.size() - 1] ^= 0x01;
  WriteFile(full);
  EXPECT_THAT(ReadWal(path_),
              StatusIs(absl::StatusCode::kDataLoss,
                       AllOf(HasSubstr("offset " + std::to_string(last)),
                             HasSubstr("last record"), HasSubstr("not a torn tail"))));
  // The same record cut one byte short is torn: the two before it load.
  WriteFile(full.substr(0, full.size() - 1));
  absl::StatusOr<WalContents> c = ReadWal(path_);
  ASSERT_THAT(c.status(), IsOk());
  EXPECT_EQ(c->records.size(), 2u);
  EXPECT_EQ(c->valid_bytes, last);
  EXPECT_EQ(c->torn_bytes, full.size() - 1 - last);
}

// A write the disk refuses part-way (ENOSPC after a short write) is cut back
// off the file at once: the log stays whole. Appends are then refused
// without touching the disk until the backoff ends, and the first one after
// it tries again and succeeds once there is room.
TEST_F(WalTest, AFailedAppendIsCutBackAndRetriedAfterItsBackoff) {
  testing::FaultEnv env;
  auto append = [](WalWriter& w, const std::string& p) {
    return w.Append(1, {reinterpret_cast<const uint8_t*>(p.data()), p.size()});
  };
  {
    auto w = WalWriter::Open(path_, 0, {.retry_backoff = absl::Hours(1), .env = &env}).value();
    ASSERT_THAT(append(*w, "first").status(), IsOk());
    const uint64_t whole = w->size();
    env.SetSpaceLeft(7);  // the header of the next record, cut short
    EXPECT_THAT(append(*w, std::string(100, 'x')).status(),
                StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("No space left")));
    EXPECT_EQ(env.short_writes(), 1u);
    EXPECT_EQ(std::filesystem::file_size(path_), whole) << "the partial record stayed";
    EXPECT_EQ(w->size(), whole);
    EXPECT_THAT(w->health(), IsOk()) << "a full disk is not final";
    EXPECT_THAT(w->write_error(), StatusIs(absl::StatusCode::kResourceExhausted, ::testing::_));
    // During the backoff: refused at once, the disk untouched.
    env.Clear();
    const uint64_t faults = env.faults();
    EXPECT_THAT(append(*w, "during").status(),
                StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("tried again in")));
    EXPECT_EQ(env.faults(), faults);
    EXPECT_EQ(std::filesystem::file_size(path_), whole);
  }
  // With no backoff the next append tries the disk: still full, refused;
  // then room, and it goes through after the record before the failure.
  auto c = ReadWal(path_).value();
  ASSERT_EQ(c.records.size(), 1u);
  EXPECT_EQ(c.torn_bytes, 0u);
  auto w = WalWriter::Open(path_, c.valid_bytes,
                           {.retry_backoff = absl::ZeroDuration(), .env = &env}).value();
  env.SetSpaceLeft(0);
  EXPECT_THAT(append(*w, "full").status(), StatusIs(absl::StatusCode::kResourceExhausted, ::testing::_));
  env.Clear();
  auto end = append(*w, "second");
  ASSERT_THAT(end.status(), IsOk());
  ASSERT_THAT(w->Sync(*end), IsOk());
  EXPECT_THAT(w->write_error(), IsOk());
  c = ReadWal(path_).value();
  ASSERT_EQ(c.records.size(), 2u);
  EXPECT_EQ(c.records[1].payload, "second");
  // A failed fsync is final: the kernel may have dropped the pages.
  env.FailSyncs(EIO);
  end = append(*w, "third");
  ASSERT_THAT(end.status(), IsOk());
  EXPECT_THAT(w->Sync(*end), StatusIs(absl::StatusCode::kUnknown,
                                      AllOf(HasSubstr("Input/output error"),
                                            HasSubstr("were cut off"))));
  env.Clear();
  EXPECT_THAT(append(*w, "fourth").status(),
              StatusIs(absl::StatusCode::kUnknown, HasSubstr("syncing the write-ahead log")));
  // The record whose fsync failed is cut off the file (it stayed there, in
  // the page cache, for a restart to replay): it ends at the last durable
  // record.
  c = ReadWal(path_).value();
  ASSERT_EQ(c.records.size(), 2u);
  EXPECT_EQ(c.records[1].payload, "second");
  EXPECT_EQ(c.torn_bytes, 0u);
  EXPECT_EQ(w->size(), c.valid_bytes);
}

TEST_F(WalTest, ConcurrentSyncsShareFsyncsAndEveryRecordIsThere) {
  auto w = WalWriter::Open(path_, 0, {.group_commit_window = absl::Milliseconds(1)}).value();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        const std::string p = std::to_string(t * 1000 + i);
        auto end = w->Append(1, {reinterpret_cast<const uint8_t*>(p.data()), p.size()});
        ASSERT_THAT(end.status(), IsOk());
        ASSERT_THAT(w->Sync(*end), IsOk());
      }
    });
  }
  for (auto& t : threads) t.join();
  auto c = ReadWal(path_).value();
  EXPECT_EQ(c.records.size(), 200u);
  std::set<std::string> seen;
  for (const auto& r : c.records) seen.insert(r.payload);
  EXPECT_EQ(seen.size(), 200u);
}

TEST(WalEntryTest, EveryOpRoundTrips) {
  IndexOptions o{.dim = 7, .metric = Metric::kCosine, .backend = Backend::kCpu,
                 .kind = IndexKind::kTree, .initial_capacity = 10};
  o.tree.leaf_size = 33;
  o.tree.branching = 5;
  o.drift.num_landmarks = 99;
  o.drift.rebase_residual = 0.25;
  o.drift.rebase_every_steps = 7;
  o.drift.seed = 42;
  const std::vector<WalEntry> entries = {
      {.op = WalOp::kCreateCollection, .collection = "docs", .options = o},
      {.op = WalOp::kDropCollection, .collection = "old"},
      {.op = WalOp::kUpsert, .collection = "docs", .model_step = -3, .ids = {1, 2},
       .vectors = {1.5f, -2.0f, 3.25f}},
      {.op = WalOp::kDelete, .collection = "docs", .allow_missing = true, .ids = {9}},
      {.op = WalOp::kChooseLandmarks, .collection = "docs"},
      {.op = WalOp::kDrift, .collection = "docs", .model_step = 12, .landmark_epoch = 3,
       .vectors = {0.5f}, .linear_a = {1, 0, 0, 1}, .linear_b = {2, 3}},
  };
  for (const WalEntry& e : entries) {
    const std::string bytes = EncodeWalEntry(e);
    absl::StatusOr<WalEntry> d = DecodeWalEntry(static_cast<uint8_t>(e.op), bytes);
    ASSERT_THAT(d.status(), IsOk());
    EXPECT_EQ(d->op, e.op);
    EXPECT_EQ(d->collection, e.collection);
    EXPECT_EQ(d->model_step, e.model_step);
    EXPECT_EQ(d->allow_missing, e.allow_missing);
    EXPECT_EQ(d->landmark_epoch, e.landmark_epoch);
    EXPECT_EQ(d->ids, e.ids);
    EXPECT_EQ(d->vectors, e.vectors);
    EXPECT_EQ(d->linear_a, e.linear_a);
    EXPECT_EQ(d->linear_b, e.linear_b);
    if (e.op == WalOp::kCreateCollection) {
      EXPECT_EQ(d->options.dim, 7);
      EXPECT_EQ(d->options.metric, Metric::kCosine);
      EXPECT_EQ(d->options.backend, Backend::kCpu);
      EXPECT_EQ(d->options.kind, IndexKind::kTree);
      EXPECT_EQ(d->options.tree.leaf_size, 33);
      EXPECT_EQ(d->options.tree.branching, 5);
      EXPECT_EQ(d->options.drift.num_landmarks, 99);
      EXPECT_EQ(d->options.drift.rebase_residual, 0.25);
      EXPECT_EQ(d->options.drift.rebase_every_steps, 7);
      EXPECT_EQ(d->options.drift.seed, 42u);
    }
    // Every truncation, and a trailing byte, is refused.
    for (size_t cut = 0; cut < bytes.size(); ++cut) {
      EXPECT_THAT(DecodeWalEntry(static_cast<uint8_t>(e.op), bytes.substr(0, cut)),
                  StatusIs(absl::StatusCode::kDataLoss, HasSubstr("does not parse")));
    }
    EXPECT_THAT(DecodeWalEntry(static_cast<uint8_t>(e.op), bytes + "x"),
                StatusIs(absl::StatusCode::kDataLoss, HasSubstr("does not parse")));
  }
  EXPECT_THAT(DecodeWalEntry(77, ""), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("77")));
}

}  // namespace
}  // namespace negmine
