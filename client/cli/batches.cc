// batches: global contrastive batch sampling, as a server job by default.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cli/commands.h"
#include "client/cli/progress.h"
#include "client/npy.h"

namespace negmine::client::cli {

absl::Status Batches(Client& c, const Args& a) {
  CLI_ASSIGN(qpath, a.Required("queries"));
  CLI_ASSIGN(ppath, a.Required("positives"));
  CLI_ASSIGN(out, a.Required("out"));
  CLI_ASSIGN(batch_size, a.Number<uint32_t>("batch-size", 0));
  CLI_ASSIGN(neighbors, a.Number<uint32_t>("neighbors", 0));
  CLI_ASSIGN(quantile, a.Number<double>("quantile", 0));
  CLI_ASSIGN(seed, a.Number<uint64_t>("seed", 1));
  const bool keep_order = a.Has("keep-batch-order");
  // A job by default: the server's synchronous limit (--max_sync_batch_examples)
  // is not in GetIndexInfo, and a job of any size answers the same batches,
  // with progress. --sync waits on the one call instead.
  const bool sync = a.Has("sync");
  if (sync && a.Has("async")) return absl::InvalidArgumentError("give --sync or --async, not both");
  CLI_CHECK(a.CheckAllUsed());
  CLI_ASSIGN(q, LoadNpyFloat(qpath));
  CLI_ASSIGN(p, LoadNpyFloat(ppath));
  if (q.rows != p.rows || q.cols != p.cols) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--queries is ", q.rows, " x ", q.cols, " but --positives is ", p.rows, " x ", p.cols,
        "; row i of each is one training example"));
  }
  v1::AssignBatchesRequest first;
  first.set_batch_size(batch_size);
  first.set_seed(seed);
  first.mutable_params()->set_neighbors(neighbors);
  first.mutable_params()->set_quantile(quantile);
  first.mutable_params()->set_keep_batch_order(keep_order);
  first.set_async(!sync);
  // A unary call first: retried while the server recovers, where the
  // stream, once past gRPC's retry buffer, would not be.
  CLI_CHECK(c.ListCollections().status());
  absl::StatusOr<v1::AssignBatchesResponse> resp;
  {
    Progress upload("batches: upload", q.rows, "examples sent");
    std::optional<Ticker> ticker;  // a synchronous call then waits for the batches
    resp = c.AssignBatches(first, q.data, p.data, q.cols, [&](size_t sent, size_t total) {
      upload.Set(sent);
      if (sent == total && sync) ticker.emplace(upload);
    });
  }
  if (!resp.ok()) return resp.status();
  v1::AssignBatchesResponse result = *std::move(resp);
  if (!sync) {
    const std::string job = result.job_id();
    Progress progress(absl::StrCat("batches: job ", job), 0, "");
    std::chrono::milliseconds poll(20);
    while (true) {
      CLI_ASSIGN(status, c.GetBatchJob(job));
      progress.SetFraction(status.state() == v1::JOB_STATE_DONE ? 1.0 : status.progress());
      if (status.state() == v1::JOB_STATE_DONE) {
        result = status.result();
        break;
      }
      if (status.state() == v1::JOB_STATE_FAILED) {
        return absl::Status(static_cast<absl::StatusCode>(status.error().code()),
                            absl::StrCat("batch job ", job, ": ", status.error().message()));
      }
      std::this_thread::sleep_for(poll);
      poll = std::min<std::chrono::milliseconds>(poll * 3 / 2, std::chrono::milliseconds(500));
    }
  }
  const size_t num = result.batches_size();
  std::vector<uint64_t> table(num * batch_size, ~uint64_t{0});
  for (size_t b = 0; b < num; ++b) {
    const auto& ids = result.batches(b).example_indices();
    std::copy(ids.begin(), ids.end(), table.begin() + b * batch_size);
  }
  CLI_CHECK(SaveNpy(out, num, batch_size, table));
  std::printf("%zu batches of %u from %" PRIu64 " examples (%" PRIu64 " graph edges, %" PRIu64
              " components) in %.2f s; in-batch similarity %.1f -> %.1f (x%.2f), bandwidth %.0f -> %.0f; "
              "wrote %s\n",
              num, batch_size, result.num_examples(), result.edges(), result.components(),
              result.seconds(), result.in_batch_similarity_before(),
              result.in_batch_similarity_after(),
              result.in_batch_similarity_before() != 0
                  ? result.in_batch_similarity_after() / result.in_batch_similarity_before()
                  : 0.0,
              result.bandwidth_before(), result.bandwidth_after(), out.c_str());
  return absl::OkStatus();
}

}  // namespace negmine::client::cli
