// The commit path and recovery under file-system faults, injected through
// the write-ahead log's and the snapshots' Env (tests/fault_env.h): a full
// disk (ENOSPC, short writes), failed fsyncs, changes the index refuses.
// Each test drives a NegativeMinerService in process, then "restarts": a
// fresh service recovers the same data dir, and the state must be exactly
// the acknowledged changes.
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/persist/wal.h"
#include "core/status.h"
#include "core/persist/wal_entry.h"
#include "core/random.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/durability.h"
#include "server/metrics.h"
#include "server/service.h"
#include "tests/fault_env.h"
#include "tests/metrics_util.h"
#include "tests/test_util.h"

namespace negmine::server {
namespace {

using ::negmine::testing::FaultEnv;
using ::negmine::testing::IsOk;
using ::negmine::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr int kDim = 4;

class DurabilityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (std::filesystem::temp_directory_path() /
            ("negmine-durability-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name()))
               .string();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override {
    service_.reset();
    std::filesystem::remove_all(dir_);
  }

  // A fresh service over the data dir, its log going through `env`.
  absl::Status Start(Env* env) {
    service_.reset();
    metrics_ = std::make_unique<Metrics>();
    service_ = std::make_unique<NegativeMinerService>(
        ServiceOptions{.worker_threads = 1,
                       .stats_interval_seconds = 0,
                       .snapshot_interval_seconds = 0,
                       .snapshot_wal_bytes = 0},
        metrics_.get());
    WalWriter::Options options;
    options.retry_backoff = absl::ZeroDuration();  // every append tries the disk
    options.max_retry_backoff = absl::ZeroDuration();
    options.env = env;
    RETURN_IF_ERROR(Recover(*service_, dir_, options));
    service_->SetReady(true);
    return absl::OkStatus();
  }

  absl::Status Create() {
    WalEntry e{.op = WalOp::kCreateCollection, .collection = "c"};
    e.options.dim = kDim;
    e.options.kind = IndexKind::kExact;
    e.options.backend = Backend::kCpu;
    return service_->Commit(e).status();
  }

  // Upserts ids [first, first + n) with vectors from `seed`; on success
  // records them as acknowledged.
  absl::Status Upsert(uint64_t first, size_t n, uint64_t seed) {
    WalEntry e{.op = WalOp::kUpsert, .collection = "c", .model_step = 1};
    Rng rng(seed, 0);
    for (size_t i = 0; i < n; ++i) {
      e.ids.push_back(first + i);
      for (int j = 0; j < kDim; ++j) e.vectors.push_back(static_cast<float>(rng.Uniform()));
    }
    absl::Status s = service_->Commit(e).status();
    if (s.ok()) {
      for (size_t i = 0; i < n; ++i) {
        acked_[first + i] = std::vector<float>(e.vectors.begin() + i * kDim,
                                               e.vectors.begin() + (i + 1) * kDim);
      }
    }
    return s;
  }

  absl::Status Delete(std::vector<uint64_t> ids, bool allow_missing) {
    WalEntry e{.op = WalOp::kDelete, .collection = "c", .allow_missing = allow_missing,
               .ids = ids};
    absl::Status s = service_->Commit(e).status();
    if (s.ok()) {
      for (uint64_t id : ids) acked_.erase(id);
    }
    return s;
  }

  // The collection holds exactly the acknowledged rows, bit-exactly.
  void ExpectAcknowledgedState(const char* when) {
    absl::StatusOr<std::shared_ptr<Collection>> c = service_->Find("c");
    ASSERT_THAT(c.status(), IsOk()) << when;
    EXPECT_EQ((*c)->index->Stats().num_targets, acked_.size()) << when;
    for (const auto& [id, want] : acked_) {
      std::vector<float> got;
      std::vector<int64_t> steps;
      const uint64_t ids[] = {id};
      ASSERT_THAT((*c)->index->Get(ids, &got, &steps), IsOk()) << when << ": id " << id;
      EXPECT_EQ(got, want) << when << ": id " << id;
    }
  }

  // Whether `id` can be read now.
  bool Visible(uint64_t id) {
    std::vector<float> got;
    std::vector<int64_t> steps;
    const uint64_t ids[] = {id};
    return service_->Find("c").value()->index->Get(ids, &got, &steps).ok();
  }

  // Appends `e` to the end of log generation 1, fsynced, as Commit does
  // before the index sees the change (the service is stopped).
  void AppendRecord(const WalEntry& e) {
    const std::string path = WalPath(dir_, 1);
    const uint64_t valid = ReadWal(path).value().valid_bytes;
    std::unique_ptr<WalWriter> w = WalWriter::Open(path, valid, {}).value();
    const std::string payload = EncodeWalEntry(e);
    absl::StatusOr<uint64_t> end =
        w->Append(static_cast<uint8_t>(e.op),
                  {reinterpret_cast<const uint8_t*>(payload.data()), payload.size()});
    ASSERT_THAT(end.status(), IsOk());
    ASSERT_THAT(w->Sync(*end), IsOk());
  }

  uint64_t LogBytes() {
    uint64_t total = 0;
    for (const auto& f : std::filesystem::directory_iterator(dir_)) {
      if (f.path().extension() == ".log") total += f.file_size();
    }
    return total;
  }

  std::string dir_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<NegativeMinerService> service_;
  std::map<uint64_t, std::vector<float>> acked_;
};

// A full disk: the write that does not fit is refused (RESOURCE_EXHAUSTED)
// and never visible, whatever byte of its record the disk filled at (short
// writes included); a snapshot attempt fails without leaving the data dir
// unstartable; once there is room, writes resume in place; a restart
// recovers exactly the acknowledged rows.
TEST_F(DurabilityTest, AFullDiskRefusesWritesInvisiblyAndTheyResumeInPlace) {
  FaultEnv env;
  ASSERT_THAT(Start(&env), IsOk());
  ASSERT_THAT(Create(), IsOk());
  ASSERT_THAT(Upsert(1, 10, 1), IsOk());
  // A 10-row upsert record is ~230 bytes: fill the disk at every 7th byte.
  uint64_t next = 100;
  for (uint64_t space = 0; space < 240; space += 7, next += 10) {
    const uint64_t before = LogBytes();
    env.SetSpaceLeft(space);
    EXPECT_THAT(Upsert(next, 10, next), StatusIs(absl::StatusCode::kResourceExhausted,
                                                 HasSubstr("No space left")))
        << "space " << space;
    EXPECT_FALSE(Visible(next)) << "a refused write is visible (space " << space << ")";
    EXPECT_EQ(LogBytes(), before) << "the partial record was not cut back (space " << space << ")";
    env.Clear();
    ASSERT_THAT(Upsert(next + 5, 1, next + 5), IsOk()) << "writes did not resume";
  }
  EXPECT_GT(env.short_writes(), 10u);
  ExpectAcknowledgedState("after the refusals");

  // Full again: a snapshot fails, and so do writes; then room comes back.
  env.SetSpaceLeft(0);
  EXPECT_THAT(service_->TakeSnapshot().status(),
              StatusIs(absl::StatusCode::kResourceExhausted, ::testing::_));
  EXPECT_THAT(Upsert(1000, 3, 7), StatusIs(absl::StatusCode::kResourceExhausted, ::testing::_));
  EXPECT_THAT(Delete({1}, false), StatusIs(absl::StatusCode::kResourceExhausted, ::testing::_));
  EXPECT_TRUE(Visible(1)) << "a refused delete took effect";
  env.Clear();
  ASSERT_THAT(Upsert(2000, 3, 8), IsOk());
  ASSERT_THAT(Delete({2}, false), IsOk());
  ExpectAcknowledgedState("after the failed snapshot");

  // The restart (a healthy disk) recovers exactly what was acknowledged.
  ASSERT_THAT(Start(nullptr), IsOk());
  ExpectAcknowledgedState("after the restart");
  ASSERT_THAT(Upsert(3000, 2, 9), IsOk());
  ASSERT_THAT(service_->TakeSnapshot().status(), IsOk());
  ASSERT_THAT(Start(nullptr), IsOk());
  ExpectAcknowledgedState("after a snapshot and a second restart");
}

// Changes the index refuses (a duplicate id, an unknown id to delete) leave
// no record behind: the log is cut back, the next change follows it, and a
// restart replays cleanly.
TEST_F(DurabilityTest, ARefusedChangeLeavesNoRecord) {
  ASSERT_THAT(Start(nullptr), IsOk());
  ASSERT_THAT(Create(), IsOk());
  ASSERT_THAT(Upsert(1, 5, 1), IsOk());
  const uint64_t before = LogBytes();
  WalEntry dup{.op = WalOp::kUpsert, .collection = "c", .ids = {7, 7},
               .vectors = std::vector<float>(2 * kDim, 1.0f)};
  EXPECT_THAT(service_->Commit(dup).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("duplicate")));
  EXPECT_THAT(Delete({99}, false), StatusIs(absl::StatusCode::kNotFound, ::testing::_));
  EXPECT_EQ(LogBytes(), before);
  ASSERT_THAT(Delete({3}, false), IsOk());
  ASSERT_THAT(Start(nullptr), IsOk());
  ExpectAcknowledgedState("after the restart");
}

// A failed fsync is final, and the change it was for is never visible: not
// after its INTERNAL answer (it used to be applied before the fsync), and
// not after a restart (its record used to stay in the file, in the page
// cache, and be replayed). Every later change and snapshot is refused until
// a restart, which recovers exactly the acknowledged changes. The same for
// a delete and a collection's creation.
TEST_F(DurabilityTest, AChangeWhoseFsyncFailedIsNeverVisibleNorReplayed) {
  FaultEnv env;
  ASSERT_THAT(Start(&env), IsOk());
  ASSERT_THAT(Create(), IsOk());
  ASSERT_THAT(Upsert(1, 5, 1), IsOk());
  const uint64_t durable = LogBytes();
  env.FailSyncs(EIO);
  EXPECT_THAT(Upsert(10, 2, 2), StatusIs(absl::StatusCode::kInternal,
                                         AllOf(HasSubstr("Input/output error"),
                                               HasSubstr("was not applied"))));
  EXPECT_FALSE(Visible(10)) << "a change whose fsync failed is visible";
  EXPECT_FALSE(Visible(11)) << "a change whose fsync failed is visible";
  EXPECT_EQ(LogBytes(), durable) << "the failed change's record stays in the log";
  env.Clear();
  EXPECT_THAT(Upsert(20, 2, 3), StatusIs(absl::StatusCode::kInternal,
                                         HasSubstr("until the server restarts")));
  EXPECT_FALSE(Visible(20));
  EXPECT_THAT(service_->TakeSnapshot().status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("restart")));
  ExpectAcknowledgedState("after the failed fsync");
  ASSERT_THAT(Start(&env), IsOk());
  ExpectAcknowledgedState("after the restart");
  EXPECT_FALSE(Visible(10)) << "the restart replayed a change whose fsync failed";

  // A delete whose fsync failed: the row stays, also after a restart.
  env.FailSyncs(EIO);
  EXPECT_THAT(Delete({1}, false), StatusIs(absl::StatusCode::kInternal,
                                           HasSubstr("was not applied")));
  EXPECT_TRUE(Visible(1)) << "a delete whose fsync failed took effect";
  env.Clear();
  ASSERT_THAT(Start(&env), IsOk());
  ExpectAcknowledgedState("after the failed delete and a restart");

  // A collection whose creation's fsync failed does not exist.
  env.FailSyncs(EIO);
  WalEntry create{.op = WalOp::kCreateCollection, .collection = "d"};
  create.options.dim = kDim;
  create.options.kind = IndexKind::kExact;
  create.options.backend = Backend::kCpu;
  EXPECT_THAT(service_->Commit(create).status(),
              StatusIs(absl::StatusCode::kInternal, HasSubstr("was not applied")));
  EXPECT_THAT(service_->Find("d").status(), StatusIs(absl::StatusCode::kNotFound, ::testing::_));
  env.Clear();
  ASSERT_THAT(Start(&env), IsOk());
  EXPECT_THAT(service_->Find("d").status(), StatusIs(absl::StatusCode::kNotFound, ::testing::_));
  ExpectAcknowledgedState("after the failed creation and a restart");
  ASSERT_THAT(Upsert(30, 1, 4), IsOk());
  ASSERT_THAT(Start(nullptr), IsOk());
  ExpectAcknowledgedState("after a last restart");
}

// A change the index refuses after its record was made durable is cut
// back off, and the cut is fsynced too (a crash of the machine could
// otherwise bring the record back): with the cut's fsync failing, the
// refusal is still the answer and the log turns final; a restart recovers
// without the refused record.
TEST_F(DurabilityTest, ARefusedChangesCutIsSynced) {
  FaultEnv env;
  ASSERT_THAT(Start(&env), IsOk());
  ASSERT_THAT(Create(), IsOk());
  ASSERT_THAT(Upsert(1, 5, 1), IsOk());
  const uint64_t before = LogBytes();
  EXPECT_THAT(Delete({99}, false), StatusIs(absl::StatusCode::kNotFound, ::testing::_));
  EXPECT_EQ(LogBytes(), before);
  ASSERT_THAT(Upsert(10, 1, 2), IsOk()) << "a synced cut leaves the log usable";
  // The record's fsync works, the cut's fails.
  env.FailSyncsAfter(1, EIO);
  EXPECT_THAT(Delete({98}, false), StatusIs(absl::StatusCode::kNotFound, ::testing::_));
  EXPECT_EQ(env.faults(), 1u) << "the cut back was not fsynced";
  env.Clear();
  EXPECT_THAT(Upsert(20, 1, 3), StatusIs(absl::StatusCode::kInternal,
                                         HasSubstr("until the server restarts")));
  ExpectAcknowledgedState("after the refused changes");
  ASSERT_THAT(Start(nullptr), IsOk());
  ExpectAcknowledgedState("after the restart");
}

// A server stopped after a refused change's record was fsynced, before it
// was cut back, leaves that record last in the log: the restart cuts it (it
// changed nothing and was never acknowledged) instead of refusing to start
// with DATA_LOSS. A refused record with another after it is still
// DATA_LOSS: only the last record can be in that window.
TEST_F(DurabilityTest, ARefusedRecordLeftLastByAStopIsCutAtTheRestart) {
  ASSERT_THAT(Start(nullptr), IsOk());
  ASSERT_THAT(Create(), IsOk());
  ASSERT_THAT(Upsert(1, 5, 1), IsOk());
  service_.reset();
  const uint64_t before = LogBytes();
  const WalEntry dup{.op = WalOp::kUpsert, .collection = "c", .ids = {7, 7},
                     .vectors = std::vector<float>(2 * kDim, 1.0f)};
  AppendRecord(dup);
  ASSERT_GT(LogBytes(), before);
  ASSERT_THAT(Start(nullptr), IsOk());
  ExpectAcknowledgedState("after the restart");
  EXPECT_FALSE(Visible(7));
  EXPECT_EQ(LogBytes(), before) << "the refused record was not cut off";
  ASSERT_THAT(Upsert(20, 2, 2), IsOk());
  ASSERT_THAT(Start(nullptr), IsOk());
  ExpectAcknowledgedState("after a second restart");

  service_.reset();
  AppendRecord(dup);
  AppendRecord({.op = WalOp::kDelete, .collection = "c", .ids = {1}});
  EXPECT_THAT(Start(nullptr),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("does not replay")));
}

// The manifest records the log generations the dir must hold: a deleted
// log stops the start with DATA_LOSS naming it (the server used to start
// empty), before and after a snapshot.
TEST_F(DurabilityTest, ADeletedLogIsDataLossNotAnEmptyStart) {
  ASSERT_THAT(Start(nullptr), IsOk());
  ASSERT_THAT(Create(), IsOk());
  ASSERT_THAT(Upsert(1, 5, 1), IsOk());
  service_.reset();
  const std::string log1 = WalPath(dir_, 1);
  std::filesystem::rename(log1, log1 + ".aside");
  EXPECT_THAT(Start(nullptr),
              StatusIs(absl::StatusCode::kDataLoss,
                       AllOf(HasSubstr("wal-000001.log is missing"), HasSubstr("MANIFEST"))));
  std::filesystem::rename(log1 + ".aside", log1);
  ASSERT_THAT(Start(nullptr), IsOk());
  ExpectAcknowledgedState("with the log back");

  // After a snapshot the log continues in generation 2; deleting it (or
  // the first log, which the only snapshot still needs) is refused too.
  ASSERT_THAT(service_->TakeSnapshot().status(), IsOk());
  ASSERT_THAT(Upsert(10, 3, 2), IsOk());
  service_.reset();
  for (uint64_t g : {2, 1}) {
    const std::string log = WalPath(dir_, g);
    std::filesystem::rename(log, log + ".aside");
    EXPECT_THAT(Start(nullptr), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("is missing")))
        << "log " << g;
    service_.reset();
    std::filesystem::rename(log + ".aside", log);
  }
  ASSERT_THAT(Start(nullptr), IsOk());
  ExpectAcknowledgedState("with every log back");
}

// The documented repair still works: the newest snapshot moved aside, the
// previous one and the logs since it recover the same state.
TEST_F(DurabilityTest, TheNewestSnapshotMovedAsideRecoversFromThePreviousOne) {
  ASSERT_THAT(Start(nullptr), IsOk());
  ASSERT_THAT(Create(), IsOk());
  ASSERT_THAT(Upsert(1, 5, 1), IsOk());
  ASSERT_THAT(service_->TakeSnapshot().status(), IsOk());
  ASSERT_THAT(Upsert(10, 5, 2), IsOk());
  const auto second = service_->TakeSnapshot();
  ASSERT_THAT(second.status(), IsOk());
  ASSERT_THAT(Upsert(20, 5, 3), IsOk());
  service_.reset();
  std::filesystem::rename(second->path, second->path + ".aside");
  ASSERT_THAT(Start(nullptr), IsOk());
  ExpectAcknowledgedState("from the previous snapshot");
  // Both snapshots gone and the first logs pruned: nothing can rebuild it.
  ASSERT_THAT(service_->TakeSnapshot().status(), IsOk());
  ASSERT_THAT(service_->TakeSnapshot().status(), IsOk());
  service_.reset();
  for (const auto& f : std::filesystem::directory_iterator(dir_)) {
    if (f.path().extension() == ".snap") std::filesystem::remove(f.path());
  }
  EXPECT_THAT(Start(nullptr), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("are missing")));
}

// Recovery says where it is: a progress line for the snapshot load and for
// the log replay (ending at 100%), and the negmine_recovery_phase and
// negmine_recovery_progress metrics, which end at "done" and 1.
TEST_F(DurabilityTest, RecoveryLogsAndPublishesItsProgress) {
  ASSERT_THAT(Start(nullptr), IsOk());
  ASSERT_THAT(Create(), IsOk());
  ASSERT_THAT(Upsert(1, 5, 1), IsOk());
  ASSERT_THAT(service_->TakeSnapshot().status(), IsOk());
  ASSERT_THAT(Upsert(10, 5, 2), IsOk());
  ASSERT_THAT(Upsert(20, 5, 3), IsOk());
  ::testing::internal::CaptureStderr();
  const absl::Status started = Start(nullptr);
  const std::string log = ::testing::internal::GetCapturedStderr();
  ASSERT_THAT(started, IsOk());
  EXPECT_THAT(log, HasSubstr("msg=\"recovery: loading the snapshot\""));
  EXPECT_THAT(log, HasSubstr("msg=\"recovery: replaying the write-ahead log\" records=0"));
  // The two upserts after the snapshot, replayed; the last line is 100%.
  EXPECT_THAT(log, HasSubstr("records=2"));
  EXPECT_THAT(log, HasSubstr("percent=100.0"));
  using ::negmine::testing::MetricValue;
  EXPECT_EQ(MetricValue(*metrics_, "negmine_recovery_phase", {{"phase", "done"}}), 1);
  EXPECT_EQ(MetricValue(*metrics_, "negmine_recovery_phase", {{"phase", "log"}}), 0);
  EXPECT_EQ(MetricValue(*metrics_, "negmine_recovery_phase", {{"phase", "snapshot"}}), 0);
  EXPECT_EQ(MetricValue(*metrics_, "negmine_recovery_progress", {}), 1);
  ExpectAcknowledgedState("after the restart");
  // A service that has not recovered says so.
  Metrics fresh;
  EXPECT_EQ(MetricValue(fresh, "negmine_recovery_phase", {{"phase", "starting"}}), 1);
  EXPECT_EQ(MetricValue(fresh, "negmine_recovery_progress", {}), 0);
}

}  // namespace
}  // namespace negmine::server
