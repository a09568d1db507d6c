// upsert, delete and generate.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/types/span.h"
#include "client/cli/commands.h"
#include "client/cli/progress.h"
#include "client/npy.h"
#include "core/store/drift_bench.h"

namespace negmine::client::cli {
namespace {

// 2^64-1 marks "no id" in the arrays the CLI writes (kPaddingId): refused
// as a target id so that a padded entry never names a real target.
absl::Status CheckIds(absl::Span<const uint64_t> ids, const char* what) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] == kPaddingId) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": id ", i, " is 2^64-1 (18446744073709551615), which negmine reserves as "
          "padding in the id arrays it writes; use ids in [0, 2^64-2]"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Upsert(Client& c, const Args& a) {
  CLI_ASSIGN(collection, a.Required("collection"));
  CLI_ASSIGN(step, a.Number<int64_t>("model-step", 0));
  CLI_ASSIGN(offset, a.Number<uint64_t>("id-offset", 0));
  // A unary call first: retried while the server recovers, where the
  // stream, once past gRPC's retry buffer, would not be. It also gives the
  // server's message limit, which the stream's messages must fit.
  CLI_ASSIGN(info, c.GetIndexInfo(collection));
  const uint32_t dim = info.info().config().dim();
  Client* upserter = &c;
  std::unique_ptr<Client> small_messages;
  const uint64_t max_message = info.limits().max_message_bytes();
  if (max_message > 0 && c.options().upsert_chunk_bytes > max_message / 2) {
    ClientOptions o = c.options();
    o.upsert_chunk_bytes = std::max<size_t>(1, max_message / 2);
    small_messages = c.WithOptions(o);
    upserter = small_messages.get();
  }
  Array<float> x;
  if (a.Has("npy")) {
    CLI_ASSIGN(loaded, LoadNpyFloat(a.Get("npy")));
    x = std::move(loaded);
  } else if (a.Has("fvecs")) {
    CLI_ASSIGN(loaded, LoadFvecs(a.Get("fvecs")));
    x = std::move(loaded);
  } else if (a.Has("random")) {
    CLI_ASSIGN(n, a.Number<uint64_t>("random", 0));
    CLI_ASSIGN(seed, a.Number<uint64_t>("seed", 1));
    DriftBench bench({.num_targets = n, .num_queries = 0,
                      .dim = static_cast<int>(dim), .seed = seed});
    x = {n, dim, bench.Targets(0)};
  } else {
    return absl::InvalidArgumentError("give one of --npy, --fvecs or --random");
  }
  if (x.cols != dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the vectors have dim ", x.cols, " but collection '", collection, "' has dim ", dim));
  }
  std::vector<uint64_t> ids(x.rows);
  if (a.Has("ids")) {
    CLI_ASSIGN(loaded, LoadNpyIds(a.Get("ids"), NegativeIds::kError, "--ids"));
    if (loaded.data.size() != x.rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--ids holds ", loaded.data.size(), " ids for ", x.rows, " vectors"));
    }
    ids = std::move(loaded.data);
  } else {
    if (x.rows > 0 && offset > kPaddingId - x.rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--id-offset = ", offset, ": ids ", offset, "..", offset, " + ", x.rows - 1,
          " would reach 2^64-1, which negmine reserves as padding"));
    }
    std::iota(ids.begin(), ids.end(), offset);
  }
  CLI_CHECK(CheckIds(ids, "--ids"));
  CLI_CHECK(a.CheckAllUsed());
  absl::StatusOr<v1::UpsertTargetsResponse> resp;
  {
    Progress progress(absl::StrCat("upsert '", collection, "'"), x.rows, "targets sent");
    Ticker ticker(progress);  // the time moves on while the server applies the last
    resp = upserter->Upsert(collection, ids, x.data, x.cols, step,
                    [&](size_t sent, size_t) { progress.Set(sent); });
  }
  if (!resp.ok()) return resp.status();
  std::printf("upserted %" PRIu64 " targets into '%s' (index version %" PRIu64 ")\n",
              resp->upserted(), collection.c_str(), resp->index_version());
  return absl::OkStatus();
}

absl::Status Delete(Client& c, const Args& a) {
  CLI_ASSIGN(collection, a.Required("collection"));
  CLI_ASSIGN(list, a.Required("ids"));
  std::vector<uint64_t> ids;
  for (absl::string_view part : absl::StrSplit(list, ',', absl::SkipWhitespace())) {
    uint64_t id;
    if (absl::StartsWith(absl::StripAsciiWhitespace(part), "-")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--ids: '", part, "' is negative; ids are unsigned 64-bit integers"));
    }
    if (!absl::SimpleAtoi(part, &id)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--ids: '", part, "' is not an id (an integer in [0, 2^64-1])"));
    }
    ids.push_back(id);
  }
  const bool allow_missing = a.Has("allow-missing");
  CLI_CHECK(a.CheckAllUsed());
  CLI_ASSIGN(resp, c.Delete(collection, ids, allow_missing));
  std::printf("deleted %" PRIu64 " targets (index version %" PRIu64 ")\n",
              resp.deleted(), resp.index_version());
  return absl::OkStatus();
}

absl::Status Generate(const Args& a) {
  CLI_ASSIGN(dim, a.Number<int>("dim", 0));
  CLI_ASSIGN(seed, a.Number<uint64_t>("seed", 1));
  CLI_ASSIGN(targets, a.Number<uint64_t>("targets", 0));
  CLI_ASSIGN(queries, a.Number<uint64_t>("queries", 0));
  CLI_ASSIGN(out, a.Required("out"));
  CLI_CHECK(a.CheckAllUsed());
  if (dim <= 0) return absl::InvalidArgumentError("--dim must be > 0");
  if ((targets > 0) == (queries > 0)) {
    return absl::InvalidArgumentError("give exactly one of --targets N or --queries N");
  }
  DriftBench bench({.num_targets = targets, .num_queries = queries, .dim = dim, .seed = seed});
  const std::vector<float> x = targets > 0 ? bench.Targets(0) : bench.Queries(0);
  CLI_CHECK(SaveNpy(out, targets + queries, dim, x));
  std::printf("wrote %" PRIu64 " x %d drift-bench %s to %s\n", targets + queries, dim,
              targets > 0 ? "targets" : "queries", out.c_str());
  return absl::OkStatus();
}

}  // namespace negmine::client::cli
