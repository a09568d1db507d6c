// ShardedClient: one collection spread over several negmine servers.
//
//   ShardedOptions options;
//   auto shards = ShardedClient::Connect({"10.0.0.1:50051", "10.0.0.2:50051"}, options);
//   RETURN_IF_ERROR(shards->CreateCollection(config));
//   RETURN_IF_ERROR(shards->Upsert("docs", ids, vectors, dim, 0));  // routed by id
//   v1::MineParams params;
//   params.set_mode(v1::MINE_MODE_SAMPLE); params.set_sampler(v1::SAMPLER_EXACT);
//   params.set_k(64); params.set_temperature(0.05f);
//   ASSIGN_OR_RETURN(ShardedMineResult r, shards->Mine("docs", queries, dim, params));
//   // r.response.results(i): global top-k, or samples of the global softmax
//   // with global log q; r.coverage, r.shard_versions.
//
// Each shard is an ordinary negmine-server owning the ids that HashRing
// gives it (the same ring as the Python package's negmine.HashRing). Writes
// go to the owner of each id; Mine goes to every shard in parallel under one
// deadline and the answers are merged exactly (docs/SHARDING.md has the
// method and the proof): top-k is the global top-k; samples follow the
// global softmax (SAMPLER_EXACT) or the Z-weighted mixture of the shards'
// proposals (SAMPLER_PROPOSAL), with or without replacement, and log q is
// global. MIXED and rank_offset take the global top out first.
//
// Failure: a shard that cannot be reached (UNAVAILABLE or DEADLINE_EXCEEDED
// after the channel's retry policy) fails the call with UNAVAILABLE naming
// it; with allow_partial the others' merged answer comes back with coverage
// < 1 and missing_shards. Any other shard error keeps its code, its message
// prefixed with the shard.
//
// Read-your-writes: the client keeps, per collection and shard, the index
// version of its last write or drift update and sends it as that shard's
// min_index_version (ShardedMineOptions::min_versions adds another
// client's). Drift: GetLandmarks of every shard, one ApplyDrift step
// broadcast; Mine calls of this client wait while a broadcast runs.
//
// Resharding (S -> 2S) is driven from the Python package
// (negmine.ShardedClient.reshard); docs/SHARDING.md has the procedure.
//
// Thread safety: a ShardedClient may be shared by threads.
#ifndef NEGMINE_CLIENT_SHARDED_CLIENT_H_
#define NEGMINE_CLIENT_SHARDED_CLIENT_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "client/negmine_client.h"

namespace negmine::client {

// splitmix64's finalizer: the ring's hash.
uint64_t Mix64(uint64_t x);

// A consistent-hash ring: shard i has `vnodes` points
// Mix64(kSalt ^ (i << 32 | v)); an id belongs to the shard of the first
// point at or after Mix64(id), wrapping (ties: the lower shard). Growing from
// S to S' shards moves ids only to the new shards.
class HashRing {
 public:
  explicit HashRing(int num_shards, int vnodes = 128);
  int Owner(uint64_t id) const;
  int num_shards() const { return num_shards_; }

 private:
  int num_shards_;
  std::vector<uint64_t> points_;
  std::vector<int> shards_;
};

struct ShardedOptions {
  ClientOptions client;  // per shard connection (its timeout is ignored)
  int vnodes = 128;
  // Default of ShardedMineOptions::allow_partial.
  bool allow_partial = false;
  // Deadline of a whole fanned-out call; 0 = none.
  std::chrono::milliseconds timeout{60000};
};

struct ShardedMineOptions {
  // Merge the answering shards when some are down (else UNAVAILABLE).
  std::optional<bool> allow_partial;
  // Per shard, an index version to wait for (another client's versions).
  std::vector<uint64_t> min_versions;
  // Also require the versions of this client's own writes.
  bool read_your_writes = true;
};

struct ShardedMineResult {
  // One QueryNegatives per query, ordered as a single server orders them;
  // index_version: the lowest of the answering shards'.
  v1::MineResponse response;
  double coverage = 1.0;            // fraction of targets on answering shards
  std::vector<int> missing_shards;  // the shards that did not answer
  std::vector<int64_t> shard_versions;  // per shard the version used; -1: missing
  // Queries whose exact-sampler merge stayed undecided at the narrowest
  // log Z width (decided by the midpoints); 0 in practice.
  int unresolved = 0;
};

class ShardedClient {
 public:
  // Connects to the shards, in shard order (the order is the shard map).
  static std::unique_ptr<ShardedClient> Connect(const std::vector<std::string>& addresses,
                                                const ShardedOptions& options = {});

  int num_shards() const { return static_cast<int>(shards_.size()); }
  const HashRing& ring() const { return ring_; }
  Client& shard(int s) { return *shards_[s]; }

  // On every shard.
  absl::Status CreateCollection(const v1::CollectionConfig& config);
  // Per shard, its CollectionInfo (shard order).
  absl::StatusOr<std::vector<v1::CollectionInfo>> Info(const std::string& collection);

  // Routed by id; ids.size() x dim row-major vectors.
  absl::Status Upsert(const std::string& collection, absl::Span<const uint64_t> ids,
                      absl::Span<const float> vectors, uint32_t dim, int64_t model_step);
  // Routed by id; returns how many were deleted.
  absl::StatusOr<uint64_t> Delete(const std::string& collection,
                                  absl::Span<const uint64_t> ids, bool allow_missing);

  // Fans out and merges; see the file comment. `exclude`: empty or one list
  // per query.
  absl::StatusOr<ShardedMineResult> Mine(const std::string& collection,
                                         absl::Span<const float> queries, uint32_t dim,
                                         const v1::MineParams& params,
                                         absl::Span<const std::vector<uint64_t>> exclude = {},
                                         const ShardedMineOptions& options = {});

  // Drift: every shard's landmarks, concatenated in shard order.
  struct Landmarks {
    std::vector<uint64_t> ids;             // re-encode these
    std::vector<size_t> offsets;           // shard s: ids[offsets[s], offsets[s + 1])
    std::vector<uint64_t> epochs;          // per shard
  };
  absl::StatusOr<Landmarks> GetLandmarks(const std::string& collection);
  // One step, broadcast: shard s gets its rows of `embeddings` (Landmarks
  // order, ids.size() x dim).
  absl::StatusOr<std::vector<v1::ApplyDriftResponse>> ApplyDrift(
      const std::string& collection, int64_t model_step, const Landmarks& landmarks,
      absl::Span<const float> embeddings, uint32_t dim);

  // Per shard, the version of this client's last write or drift update.
  std::vector<uint64_t> Versions(const std::string& collection);

 private:
  ShardedClient(std::vector<std::string> addresses, const ShardedOptions& options);

  std::string Name(int s) const;
  // A shard error as the sharded call's status.
  absl::Status ShardError(int s, const absl::Status& status) const;
  static bool IsDown(const absl::Status& status);
  // A Client for shard s whose calls end at `deadline`.
  std::unique_ptr<Client> ShardFor(int s, std::chrono::steady_clock::time_point deadline) const;
  std::chrono::steady_clock::time_point Deadline() const;
  void NoteVersion(const std::string& collection, int s, uint64_t version);
  // Cached per-shard sizes (refreshed when unknown or empty, or asked).
  absl::StatusOr<std::vector<int64_t>> Sizes(const std::string& collection,
                                             std::chrono::steady_clock::time_point deadline,
                                             bool allow_partial, std::vector<bool>* down,
                                             int refresh_shard = -1);
  void ForgetSizes(const std::string& collection);

  std::vector<std::string> addresses_;
  ShardedOptions options_;
  std::vector<std::unique_ptr<Client>> shards_;
  HashRing ring_;
  // Mine holds it shared; a drift broadcast exclusively.
  std::shared_mutex gate_;
  std::mutex mu_;  // guards versions_ and sizes_
  std::map<std::string, std::vector<uint64_t>> versions_;
  std::map<std::string, std::vector<int64_t>> sizes_;  // -1: unknown
};

}  // namespace negmine::client

#endif  // NEGMINE_CLIENT_SHARDED_CLIENT_H_
