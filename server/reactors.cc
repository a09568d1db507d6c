#include "server/reactors.h"

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/log.h"
#include "server/rpc.h"
#include "server/service.h"
#include "server/wire.h"

namespace negmine::server {
namespace {

// Reads UpsertTargets messages one at a time; each is parsed and applied on
// the write pool before the next read starts, so messages apply in order
// and a slow disk or index backs pressure up to the client. The stream ends
// OK only when the client closed it and every message was applied.
class UpsertReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  UpsertReactor(NegativeMinerService* service, grpc::ByteBuffer* out)
      : service_(service), out_(out), start_(Clock::now()) {
    StartRead(reader_.buffer());
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The client closed its side: everything it sent has been applied.
      SerializeTo(resp_, out_);
      Finish(absl::OkStatus());
      return;
    }
    absl::Status queued = service_->Enqueue(
        [this] {
          absl::Status status;
          if (!service_->ready()) {
            status = NotReady();
          } else {
            status = reader_.Parse(&request_);
            if (status.ok()) {
              if (first_) {
                stream_collection_ = request_.collection();
                first_ = false;
              }
              status = service_->DoUpsert(request_, stream_collection_, &resp_, &labels_);
            }
          }
          if (!status.ok()) {
            Fail(status);
            return;
          }
          ++messages_;
          // A bulk load says how far it is, every 10 s while it runs.
          progress_.Update(-1, {{"collection", stream_collection_.empty() ? "default"
                                                                        : stream_collection_},
                               {"messages", absl::StrCat(messages_)},
                               {"rows", absl::StrCat(resp_.upserted())}});
          StartRead(reader_.buffer());
        },
        NegativeMinerService::Pool::kWrites);
    if (!queued.ok()) Fail(queued);
  }

  void OnDone() override { delete this; }

 private:
  // Ends the stream with `status`, saying how much of it was applied.
  void Fail(const absl::Status& status) {
    Finish(absl::Status(status.code(),
                        absl::StrCat(status.message(), " (message ", messages_ + 1,
                                     " of the stream; the ", messages_,
                                     " messages before it were applied, ", resp_.upserted(),
                                     " rows)")));
  }

  void Finish(const absl::Status& status) {
    const grpc::Status g = ToGrpc(status);
    service_->metrics().ObserveRequest("UpsertTargets", CodeName(g.error_code()),
                                       SecondsSince(start_), labels_);
    grpc::ServerReadReactor<grpc::ByteBuffer>::Finish(g);
  }

  NegativeMinerService* service_;
  grpc::ByteBuffer* const out_;
  const Clock::time_point start_;
  MessageReader<v1::UpsertTargetsRequest> reader_{"UpsertTargets"};
  v1::UpsertTargetsRequest request_;
  v1::UpsertTargetsResponse resp_;
  RequestLabels labels_;
  // The first line comes after the first interval, so short streams log
  // nothing; no "percent" (a stream's length is not known ahead).
  ProgressLog progress_{"upsert stream in progress", absl::Seconds(10), /*first=*/false};
  std::string stream_collection_;
  bool first_ = true;
  size_t messages_ = 0;
};

// MineStream: each request is parsed and mined on the pool, one at a time per
// stream so that responses keep request order. Responses queue for the one
// write in flight; when kMaxQueuedWrites are waiting (a slow reader), the
// reactor stops reading, so a slow client holds its own memory bounded and
// no worker waits on it. A request that does not parse ends the stream with
// INVALID_ARGUMENT once the answers before it are written; nothing after it
// is read.
class MineStreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  static constexpr size_t kMaxQueuedWrites = 8;

  MineStreamReactor(NegativeMinerService* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), start_(Clock::now()) {
    absl::MutexLock lock(&mu_);
    read_outstanding_ = true;
    StartRead(reader_.buffer());
  }

  void OnReadDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      read_outstanding_ = false;
      if (!ok) {
        reads_done_ = true;
        MaybeFinishLocked();
        return;
      }
      task_running_ = true;  // no read starts until Process is done
    }
    const bool bulk = reader_.buffer()->Length() > service_->options().bulk_request_bytes;
    absl::Status queued =
        service_->Enqueue([this] { Process(absl::OkStatus()); },
                          bulk ? NegativeMinerService::Pool::kBulk
                               : NegativeMinerService::Pool::kRequests);
    if (!queued.ok()) Process(queued);  // this item fails at once; the stream goes on
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    queued_.pop_front();
    if (!ok) {
      // The client is gone: drop what is queued and wind down.
      broken_ = true;
      queued_.clear();
    }
    if (!queued_.empty()) {
      StartWrite(queued_.front().get());
    } else {
      writing_ = false;
    }
    MaybeReadLocked();
    MaybeFinishLocked();
  }

  void OnDone() override { delete this; }

 private:
  // Answers the item read last; `refused` (not OK) answers it without work.
  void Process(const absl::Status& refused) {
    auto resp = std::make_unique<v1::MineResponse>();
    const Clock::time_point item_start = Clock::now();
    absl::Status parsed = reader_.Parse(&request_);
    if (!parsed.ok()) {
      service_->metrics().ObserveRequest("MineStream.item",
                                         CodeName(grpc::StatusCode::INVALID_ARGUMENT),
                                         SecondsSince(item_start), {});
      absl::MutexLock lock(&mu_);
      task_running_ = false;
      failed_ = absl::Status(parsed.code(),
                             absl::StrCat(parsed.message(), " (", reader_.count() - 1,
                                          " requests before it were answered)"));
      MaybeFinishLocked();
      return;
    }
    RequestLabels labels;
    absl::Status status = !refused.ok() ? refused
                          : service_->ready()
                              ? service_->DoMine(
                                    request_, resp.get(), [this] { return ctx_->IsCancelled(); },
                                    &labels)
                              : NotReady();
    if (!status.ok()) {
      resp->Clear();
      resp->set_request_id(request_.request_id());
    }
    resp->mutable_status()->set_code(static_cast<int>(status.code()));
    resp->mutable_status()->set_message(std::string(status.message()));
    service_->metrics().ObserveRequest(
        "MineStream.item", CodeName(static_cast<grpc::StatusCode>(status.code())),
        SecondsSince(item_start), labels);
    auto bytes = std::make_unique<grpc::ByteBuffer>();
    SerializeTo(*resp, bytes.get());
    resp.reset();

    absl::MutexLock lock(&mu_);
    task_running_ = false;
    if (!broken_) {
      queued_.push_back(std::move(bytes));
      if (!writing_) {
        writing_ = true;
        StartWrite(queued_.front().get());
      }
    }
    MaybeReadLocked();
    MaybeFinishLocked();
  }

  void MaybeReadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (read_outstanding_ || task_running_ || reads_done_ || broken_ || !failed_.ok() ||
        queued_.size() >= kMaxQueuedWrites) {
      return;
    }
    read_outstanding_ = true;
    StartRead(reader_.buffer());
  }

  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || read_outstanding_ || task_running_ || writing_) return;
    if (!reads_done_ && !broken_ && failed_.ok()) return;
    finished_ = true;
    const grpc::Status g = broken_ ? grpc::Status(grpc::StatusCode::CANCELLED, "client went away")
                                   : ToGrpc(failed_);
    service_->metrics().ObserveRequest("MineStream", CodeName(g.error_code()),
                                       SecondsSince(start_), {});
    Finish(g);
  }

  NegativeMinerService* service_;
  grpc::CallbackServerContext* const ctx_;
  const Clock::time_point start_;
  absl::Mutex mu_;
  // Written by the read, then parsed by Process (never both at once).
  MessageReader<v1::MineRequest> reader_{"MineStream"};
  v1::MineRequest request_;
  std::deque<std::unique_ptr<grpc::ByteBuffer>> queued_ ABSL_GUARDED_BY(mu_);
  bool read_outstanding_ ABSL_GUARDED_BY(mu_) = false;
  bool task_running_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // A request that did not parse: the stream's final status.
  absl::Status failed_ ABSL_GUARDED_BY(mu_);
};

// Reads the examples, then runs the assignment as a BatchJobs job: the
// call finishes with the batches when the job ends (or, with `async`, at
// once with the job's id).
class AssignBatchesReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  AssignBatchesReactor(NegativeMinerService* service, grpc::ByteBuffer* out)
      : service_(service), out_(out), start_(Clock::now()) {
    StartRead(reader_.buffer());
  }

  void OnReadDone(bool ok) override {
    absl::Status status = !ok ? Run() : reader_.Parse(&request_);
    if (ok && status.ok()) status = Take();
    if (!status.ok()) {
      Finish(status);
    } else if (ok) {
      StartRead(reader_.buffer());
    }
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    if (job_ != nullptr) job_->cancel = true;
  }

  void OnDone() override { delete this; }

 private:
  // One message: the first carries the options; every one a chunk of rows.
  absl::Status Take() {
    if (!service_->ready()) return NotReady();
    if (messages_++ == 0) {
      if (absl::Status s = FromAssignBatchesOptions(request_, &options_, &async_, &dim_);
          !s.ok()) {
        return s;
      }
    }
    const uint64_t total = queries_.size() / dim_ + request_.queries().rows();
    if (absl::Status s = AppendExamples(request_, dim_, messages_, &queries_, &positives_);
        !s.ok()) {
      return s;
    }
    if (total > service_->options().max_batch_examples) {
      return absl::ResourceExhaustedError(
          absl::StrCat(total, " examples exceed the server's max_batch_examples = ",
                       service_->options().max_batch_examples));
    }
    return absl::OkStatus();
  }

  // The client closed its side: start the job.
  absl::Status Run() {
    if (queries_.empty()) {
      return absl::InvalidArgumentError("AssignBatches got no examples");
    }
    const size_t n = queries_.size() / dim_;
    if (!async_ && n > service_->options().max_sync_batch_examples) {
      return absl::ResourceExhaustedError(absl::StrCat(
          n, " examples exceed the server's max_sync_batch_examples = ",
          service_->options().max_sync_batch_examples, "; set async and poll GetBatchJob"));
    }
    std::function<void(BatchJobs::Job&)> on_done;
    if (!async_) {
      on_done = [this](BatchJobs::Job& job) {
        { absl::MutexLock gate(&mu_); }  // Run has finished with the reactor
        absl::Status status;
        {
          absl::MutexLock lock(&job.mu);
          status = job.status;
          if (status.ok()) SerializeTo(job.result, out_);
        }
        Finish(status);
      };
    }
    {
      absl::MutexLock lock(&mu_);
      absl::StatusOr<std::shared_ptr<BatchJobs::Job>> job = service_->batch_jobs().Start(
          std::move(queries_), std::move(positives_), dim_, options_, std::move(on_done));
      if (!job.ok()) return job.status();
      job_ = *std::move(job);
      Log(LogLevel::kInfo, "batch assignment started",
          {{"job", job_->id},
           {"examples", absl::StrCat(n)},
           {"batch_size", absl::StrCat(options_.batch_size)},
           {"async", async_ ? "true" : "false"}});
      if (!async_) return absl::OkStatus();
      v1::AssignBatchesResponse resp;
      resp.set_job_id(job_->id);
      resp.set_num_examples(n);
      SerializeTo(resp, out_);
    }
    Finish(absl::OkStatus());
    return absl::OkStatus();
  }

  void Finish(const absl::Status& status) {
    const grpc::Status g = ToGrpc(status);
    service_->metrics().ObserveRequest("AssignBatches", CodeName(g.error_code()),
                                       SecondsSince(start_), {});
    grpc::ServerReadReactor<grpc::ByteBuffer>::Finish(g);
  }

  NegativeMinerService* service_;
  grpc::ByteBuffer* const out_;
  const Clock::time_point start_;
  MessageReader<v1::AssignBatchesRequest> reader_{"AssignBatches"};
  v1::AssignBatchesRequest request_;
  size_t messages_ = 0;
  uint32_t dim_ = 0;
  bool async_ = false;
  BatchOptions options_;
  std::vector<float> queries_, positives_;
  absl::Mutex mu_;
  std::shared_ptr<BatchJobs::Job> job_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

grpc::ServerReadReactor<grpc::ByteBuffer>* NewUpsertReactor(NegativeMinerService* service,
                                                            grpc::ByteBuffer* out) {
  return new UpsertReactor(service, out);
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* NewMineStreamReactor(
    NegativeMinerService* service, grpc::CallbackServerContext* ctx) {
  return new MineStreamReactor(service, ctx);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* NewAssignBatchesReactor(NegativeMinerService* service,
                                                                   grpc::ByteBuffer* out) {
  return new AssignBatchesReactor(service, out);
}

}  // namespace negmine::server
