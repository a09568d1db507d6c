// landmarks and drift.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/cli/commands.h"
#include "client/cli/progress.h"
#include "client/npy.h"
#include "core/store/drift_bench.h"

namespace negmine::client::cli {

absl::Status Landmarks(Client& c, const Args& a) {
  CLI_ASSIGN(collection, a.Required("collection"));
  const std::string out = a.Get("ids-out");
  const bool json = a.Has("json");
  CLI_CHECK(a.CheckAllUsed());
  CLI_ASSIGN(resp, c.GetLandmarks(collection));
  const std::vector<uint64_t> ids(resp.ids().begin(), resp.ids().end());
  if (!out.empty()) CLI_CHECK(SaveNpy(out, ids.size(), 1, ids));
  if (json) {
    std::printf("{\"landmark_epoch\": %" PRIu64 ", \"num_landmarks\": %zu, \"ids\": [%s]}\n",
                resp.landmark_epoch(), ids.size(), absl::StrJoin(ids, ", ").c_str());
    return absl::OkStatus();
  }
  std::printf("landmark epoch %" PRIu64 ": %zu landmarks\n", resp.landmark_epoch(), ids.size());
  if (!out.empty()) std::printf("wrote their ids to %s\n", out.c_str());
  return absl::OkStatus();
}

absl::Status Drift(Client& c, const Args& a) {
  CLI_ASSIGN(collection, a.Required("collection"));
  if (!a.Has("model-step")) return absl::InvalidArgumentError("--model-step is required");
  CLI_ASSIGN(step, a.Number<int64_t>("model-step", 0));
  CLI_ASSIGN(dim, CollectionDim(c, collection));
  absl::StatusOr<v1::ApplyDriftResponse> resp;
  // ApplyDrift reports no progress: the elapsed time while it runs.
  Progress progress(absl::StrCat("drift update of '", collection, "'"), 0, "");
  std::optional<Ticker> ticker;
  if (a.Has("simulate")) {
    CLI_ASSIGN(seed, a.Number<uint64_t>("seed", 1));
    CLI_CHECK(a.CheckAllUsed());
    CLI_ASSIGN(lm, c.GetLandmarks(collection));
    CLI_ASSIGN(info, c.GetIndexInfo(collection));
    // The drift-bench encoder over rows 0..max id: ids are rows.
    uint64_t max_id = 0;
    for (uint64_t id : lm.ids()) max_id = std::max(max_id, id);
    DriftBench bench({.num_targets = std::max<uint64_t>(max_id + 1, info.info().num_targets()),
                      .num_queries = 0, .dim = static_cast<int>(dim), .seed = seed});
    const std::vector<size_t> rows(lm.ids().begin(), lm.ids().end());
    ticker.emplace(progress);
    resp = c.ApplyDrift(collection, step, lm.landmark_epoch(),
                        bench.EncodeTargets(static_cast<double>(step), rows), dim);
  } else if (a.Has("landmark-embeddings")) {
    CLI_ASSIGN(epoch, a.Number<uint64_t>("epoch", 0));
    if (!a.Has("epoch")) {
      return absl::InvalidArgumentError(
          "--epoch is required with --landmark-embeddings (see `negmine landmarks`)");
    }
    CLI_ASSIGN(g, LoadNpyFloat(a.Get("landmark-embeddings")));
    CLI_CHECK(a.CheckAllUsed());
    ticker.emplace(progress);
    resp = c.ApplyDrift(collection, step, epoch, g.data, g.cols);
  } else if (a.Has("linear-a")) {
    CLI_ASSIGN(m, LoadNpyFloat(a.Get("linear-a")));
    std::vector<float> b;
    if (a.Has("linear-b")) {
      CLI_ASSIGN(loaded, LoadNpyFloat(a.Get("linear-b")));
      b = std::move(loaded.data);
    }
    CLI_CHECK(a.CheckAllUsed());
    ticker.emplace(progress);
    resp = c.ApplyLinearMap(collection, step, m.data, b, m.cols);
  } else {
    return absl::InvalidArgumentError(
        "give one of --landmark-embeddings, --linear-a or --simulate");
  }
  ticker.reset();
  if (!resp.ok()) return resp.status();
  std::printf("drift at step %" PRId64 ": kernel=%s held-out residual %.4f (no correction %.4f) "
              "fit %.3fs apply %.3fs%s; index version %" PRIu64 ", landmark epoch %" PRIu64 "\n",
              step, resp->kernel().c_str(), resp->heldout_residual(), resp->stale_residual(),
              resp->fit_seconds(), resp->apply_seconds(), resp->rebased() ? ", re-based" : "",
              resp->index_version(), resp->landmark_epoch());
  return absl::OkStatus();
}

}  // namespace negmine::client::cli
