// ShardedClient: the ring, routing of writes, drift broadcast and the
// per-shard bookkeeping. Mine and its merges are in sharded_mine.cc.
#include "client/sharded_client.h"

#include <algorithm>
#include <future>
#include <utility>

#include "absl/strings/str_cat.h"

namespace negmine::client {
namespace {

constexpr uint64_t kRingSalt = 0x6E65676D696E6500ULL;  // "negmine\0"
using Clock = std::chrono::steady_clock;

}  // namespace

uint64_t Mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

HashRing::HashRing(int num_shards, int vnodes) : num_shards_(num_shards) {
  std::vector<std::pair<uint64_t, int>> pts;
  for (int s = 0; s < num_shards; ++s) {
    for (int v = 0; v < vnodes; ++v) {
      pts.emplace_back(Mix64(kRingSalt ^ ((uint64_t(s) << 32) | uint64_t(v))), s);
    }
  }
  std::sort(pts.begin(), pts.end());
  for (const auto& [p, s] : pts) {
    points_.push_back(p);
    shards_.push_back(s);
  }
}

int HashRing::Owner(uint64_t id) const {
  const uint64_t h = Mix64(id);
  size_t pos = std::lower_bound(points_.begin(), points_.end(), h) - points_.begin();
  return shards_[pos % points_.size()];
}

std::unique_ptr<ShardedClient> ShardedClient::Connect(const std::vector<std::string>& addresses,
                                                      const ShardedOptions& options) {
  return std::unique_ptr<ShardedClient>(new ShardedClient(addresses, options));
}

ShardedClient::ShardedClient(std::vector<std::string> addresses, const ShardedOptions& options)
    : addresses_(std::move(addresses)),
      options_(options),
      ring_(static_cast<int>(addresses_.size()), options.vnodes) {
  for (const std::string& a : addresses_) shards_.push_back(Client::Connect(a, options.client));
}

std::string ShardedClient::Name(int s) const {
  return absl::StrCat("shard ", s, " (", addresses_[s], ")");
}

bool ShardedClient::IsDown(const absl::Status& status) {
  return status.code() == absl::StatusCode::kUnavailable ||
         status.code() == absl::StatusCode::kDeadlineExceeded;
}

absl::Status ShardedClient::ShardError(int s, const absl::Status& status) const {
  if (IsDown(status)) {
    return absl::UnavailableError(
        absl::StrCat(Name(s), " is unavailable (", status.message(), ")"));
  }
  return absl::Status(status.code(), absl::StrCat(Name(s), ": ", status.message()));
}

Clock::time_point ShardedClient::Deadline() const {
  if (options_.timeout.count() <= 0) return Clock::time_point::max();
  return Clock::now() + options_.timeout;
}

std::unique_ptr<Client> ShardedClient::ShardFor(int s, Clock::time_point deadline) const {
  ClientOptions o = shards_[s]->options();
  if (deadline != Clock::time_point::max()) {
    o.timeout = std::max(std::chrono::milliseconds(1),
                         std::chrono::duration_cast<std::chrono::milliseconds>(
                             deadline - Clock::now()));
  }
  return shards_[s]->WithOptions(o);
}

void ShardedClient::NoteVersion(const std::string& collection, int s, uint64_t version) {
  std::lock_guard<std::mutex> l(mu_);
  auto& v = versions_[collection];
  v.resize(shards_.size(), 0);
  v[s] = std::max(v[s], version);
}

std::vector<uint64_t> ShardedClient::Versions(const std::string& collection) {
  std::lock_guard<std::mutex> l(mu_);
  auto& v = versions_[collection];
  v.resize(shards_.size(), 0);
  return v;
}

void ShardedClient::ForgetSizes(const std::string& collection) {
  std::lock_guard<std::mutex> l(mu_);
  sizes_.erase(collection);
}

absl::StatusOr<std::vector<int64_t>> ShardedClient::Sizes(const std::string& collection,
                                                          Clock::time_point deadline,
                                                          bool allow_partial,
                                                          std::vector<bool>* down,
                                                          int refresh_shard) {
  std::vector<int64_t> sizes;
  {
    std::lock_guard<std::mutex> l(mu_);
    auto& cached = sizes_[collection];
    cached.resize(shards_.size(), -1);
    sizes = cached;
  }
  std::vector<int> need;
  for (int s = 0; s < num_shards(); ++s) {
    if ((*down)[s]) continue;
    if (sizes[s] <= 0 || s == refresh_shard) need.push_back(s);
  }
  std::vector<std::future<absl::StatusOr<int64_t>>> futures;
  for (int s : need) {
    futures.push_back(std::async(std::launch::async, [&, s]() -> absl::StatusOr<int64_t> {
      auto list = ShardFor(s, deadline)->ListCollections();
      if (!list.ok()) return list.status();
      for (const v1::CollectionInfo& c : *list) {
        if (c.config().name() == collection) return static_cast<int64_t>(c.num_targets());
      }
      return absl::NotFoundError(absl::StrCat("collection '", collection, "' does not exist"));
    }));
  }
  for (size_t i = 0; i < need.size(); ++i) {
    absl::StatusOr<int64_t> n = futures[i].get();
    const int s = need[i];
    if (!n.ok()) {
      if (IsDown(n.status()) && allow_partial) {
        (*down)[s] = true;
        continue;
      }
      return ShardError(s, n.status());
    }
    sizes[s] = *n;
  }
  std::lock_guard<std::mutex> l(mu_);
  auto& cached = sizes_[collection];
  for (int s = 0; s < num_shards(); ++s) {
    if (sizes[s] >= 0) cached[s] = sizes[s];
  }
  return sizes;
}

absl::Status ShardedClient::CreateCollection(const v1::CollectionConfig& config) {
  const auto deadline = Deadline();
  std::vector<std::future<absl::Status>> futures;
  for (int s = 0; s < num_shards(); ++s) {
    futures.push_back(std::async(std::launch::async, [&, s] {
      return ShardFor(s, deadline)->CreateCollection(config).status();
    }));
  }
  absl::Status first;
  for (int s = 0; s < num_shards(); ++s) {
    absl::Status st = futures[s].get();
    if (!st.ok() && first.ok()) first = ShardError(s, st);
  }
  return first;
}

absl::StatusOr<std::vector<v1::CollectionInfo>> ShardedClient::Info(
    const std::string& collection) {
  const auto deadline = Deadline();
  std::vector<std::future<absl::StatusOr<v1::GetIndexInfoResponse>>> futures;
  for (int s = 0; s < num_shards(); ++s) {
    futures.push_back(std::async(std::launch::async, [&, s] {
      return ShardFor(s, deadline)->GetIndexInfo(collection);
    }));
  }
  std::vector<v1::CollectionInfo> out;
  absl::Status first;
  for (int s = 0; s < num_shards(); ++s) {
    auto r = futures[s].get();
    if (!r.ok()) {
      if (first.ok()) first = ShardError(s, r.status());
      continue;
    }
    out.push_back(r->info());
  }
  if (!first.ok()) return first;
  return out;
}

absl::Status ShardedClient::Upsert(const std::string& collection,
                                   absl::Span<const uint64_t> ids,
                                   absl::Span<const float> vectors, uint32_t dim,
                                   int64_t model_step) {
  if (vectors.size() != ids.size() * dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "vectors has ", vectors.size(), " floats, not ids.size() * dim = ", ids.size() * dim));
  }
  std::vector<std::vector<uint64_t>> id_of(num_shards());
  std::vector<std::vector<float>> vec_of(num_shards());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int s = ring_.Owner(ids[i]);
    id_of[s].push_back(ids[i]);
    vec_of[s].insert(vec_of[s].end(), vectors.begin() + i * dim, vectors.begin() + (i + 1) * dim);
  }
  const auto deadline = Deadline();
  std::vector<std::future<absl::StatusOr<v1::UpsertTargetsResponse>>> futures(num_shards());
  for (int s = 0; s < num_shards(); ++s) {
    if (id_of[s].empty()) continue;
    futures[s] = std::async(std::launch::async, [&, s] {
      return ShardFor(s, deadline)->Upsert(collection, id_of[s], vec_of[s], dim, model_step);
    });
  }
  absl::Status first;
  for (int s = 0; s < num_shards(); ++s) {
    if (id_of[s].empty()) continue;
    auto r = futures[s].get();
    if (!r.ok()) {
      if (first.ok()) first = ShardError(s, r.status());
      continue;
    }
    NoteVersion(collection, s, r->index_version());
  }
  ForgetSizes(collection);
  return first;
}

absl::StatusOr<uint64_t> ShardedClient::Delete(const std::string& collection,
                                               absl::Span<const uint64_t> ids,
                                               bool allow_missing) {
  std::vector<std::vector<uint64_t>> id_of(num_shards());
  for (uint64_t id : ids) id_of[ring_.Owner(id)].push_back(id);
  const auto deadline = Deadline();
  std::vector<std::future<absl::StatusOr<v1::DeleteTargetsResponse>>> futures(num_shards());
  for (int s = 0; s < num_shards(); ++s) {
    if (id_of[s].empty()) continue;
    futures[s] = std::async(std::launch::async, [&, s] {
      return ShardFor(s, deadline)->Delete(collection, id_of[s], allow_missing);
    });
  }
  absl::Status first;
  uint64_t deleted = 0;
  for (int s = 0; s < num_shards(); ++s) {
    if (id_of[s].empty()) continue;
    auto r = futures[s].get();
    if (!r.ok()) {
      if (first.ok()) first = ShardError(s, r.status());
      continue;
    }
    deleted += r->deleted();
    NoteVersion(collection, s, r->index_version());
  }
  ForgetSizes(collection);
  if (!first.ok()) return first;
  return deleted;
}

absl::StatusOr<ShardedClient::Landmarks> ShardedClient::GetLandmarks(
    const std::string& collection) {
  const auto deadline = Deadline();
  std::vector<std::future<absl::StatusOr<v1::GetLandmarksResponse>>> futures;
  for (int s = 0; s < num_shards(); ++s) {
    futures.push_back(std::async(std::launch::async, [&, s] {
      return ShardFor(s, deadline)->GetLandmarks(collection);
    }));
  }
  Landmarks out;
  out.offsets.push_back(0);
  absl::Status first;
  for (int s = 0; s < num_shards(); ++s) {
    auto r = futures[s].get();
    if (!r.ok()) {
      if (first.ok()) first = ShardError(s, r.status());
      out.offsets.push_back(out.ids.size());
      out.epochs.push_back(0);
      continue;
    }
    out.ids.insert(out.ids.end(), r->ids().begin(), r->ids().end());
    out.offsets.push_back(out.ids.size());
    out.epochs.push_back(r->landmark_epoch());
  }
  if (!first.ok()) return first;
  return out;
}

absl::StatusOr<std::vector<v1::ApplyDriftResponse>> ShardedClient::ApplyDrift(
    const std::string& collection, int64_t model_step, const Landmarks& landmarks,
    absl::Span<const float> embeddings, uint32_t dim) {
  if (landmarks.offsets.size() != shards_.size() + 1 ||
      embeddings.size() != landmarks.ids.size() * dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "embeddings has ", embeddings.size(), " floats for ", landmarks.ids.size(),
        " landmarks of dim ", dim, " over ", landmarks.offsets.size() - 1, " shards; need ",
        shards_.size(), " shards"));
  }
  const auto deadline = Deadline();
  // No Mine call of this client runs while the shards change models.
  std::unique_lock<std::shared_mutex> gate(gate_);
  std::vector<std::future<absl::StatusOr<v1::ApplyDriftResponse>>> futures;
  for (int s = 0; s < num_shards(); ++s) {
    futures.push_back(std::async(std::launch::async, [&, s] {
      const size_t b = landmarks.offsets[s] * dim, e = landmarks.offsets[s + 1] * dim;
      return ShardFor(s, deadline)->ApplyDrift(collection, model_step, landmarks.epochs[s],
                                               embeddings.subspan(b, e - b), dim);
    }));
  }
  std::vector<v1::ApplyDriftResponse> out;
  absl::Status first;
  for (int s = 0; s < num_shards(); ++s) {
    auto r = futures[s].get();
    if (!r.ok()) {
      if (first.ok()) first = ShardError(s, r.status());
      continue;
    }
    NoteVersion(collection, s, r->index_version());
    out.push_back(*r);
  }
  if (!first.ok()) return first;
  return out;
}

}  // namespace negmine::client
