// The collection registry: the named indexes a server holds, and how a new
// one is made (the backend, the CPU fallback, the coalescer).
//
// Changes of the registry itself (a collection created or dropped) go
// through the commit path (server/commit.h), which logs them; Insert and
// Erase take the log step as a callback, run under the registry's lock
// once the change is known to be valid, so that what is logged is exactly
// what is applied.
//
// Thread safety: every method may be called from any thread; the lock is a
// leaf (nothing else is acquired under it but the callbacks' log append).
#ifndef NEGMINE_SERVER_REGISTRY_H_
#define NEGMINE_SERVER_REGISTRY_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/index.h"
#include "server/coalescer.h"

namespace negmine::server {

// One named index.
struct Collection {
  std::string name;
  std::unique_ptr<Index> index;
  // Merges concurrent searches (null: searches go to the index directly).
  std::unique_ptr<SearchCoalescer> coalescer;
  // Held across a change and its log record, so that the log's order is
  // the order the changes were applied in.
  absl::Mutex write_mu;
  bool dropped ABSL_GUARDED_BY(write_mu) = false;
  // A GetLandmarks returned here: later ones only read the set.
  bool landmarks_chosen ABSL_GUARDED_BY(write_mu) = false;
};

// The index version a collection serves now (cheap).
uint64_t IndexVersion(const Collection& c);

class CollectionRegistry {
 public:
  struct Options {
    // A collection created with backend `cuda` where CUDA is not built or
    // no GPU is visible is served on the CPU (logged) instead of refused.
    bool allow_cpu_fallback = false;
    // Micro-batching (server/coalescer.h): on CUDA collections, and on CPU
    // ones too when coalesce_cpu. max_queries 0: never.
    SearchCoalescer::Options coalesce;
    bool coalesce_cpu = false;
    // Makes the indexes; null: CreateIndex. Tests wrap a real index here.
    std::function<absl::StatusOr<std::unique_ptr<Index>>(const IndexOptions&)> index_factory;
  };

  explicit CollectionRegistry(Options options) : options_(std::move(options)) {}

  // The collection `name` ("" = "default"), or NOT_FOUND (INVALID_ARGUMENT
  // for a name that is not one).
  absl::StatusOr<std::shared_ptr<Collection>> Find(const std::string& name) const;
  // Every collection, by name.
  std::vector<std::shared_ptr<Collection>> List() const;

  // A new collection over an index made for `options` (with the CPU
  // fallback), not yet registered.
  absl::StatusOr<std::shared_ptr<Collection>> Make(const std::string& name,
                                                   const IndexOptions& options) const;

  // Registers `c`: ALREADY_EXISTS if its name is taken; else `before()`
  // (its error is returned, nothing registered), then `c` is registered.
  absl::Status Insert(std::shared_ptr<Collection> c,
                      const std::function<absl::Status()>& before);
  // Unregisters `name`: NOT_FOUND if absent; else `before()` (its error is
  // returned, nothing changed), then the collection is marked dropped and
  // returned.
  absl::StatusOr<std::shared_ptr<Collection>> Erase(
      const std::string& name, const std::function<absl::Status()>& before);

 private:
  const Options options_;
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Collection>> collections_ ABSL_GUARDED_BY(mu_);
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_REGISTRY_H_
