#include "server/registry.h"

#include "absl/strings/str_cat.h"
#include "server/log.h"
#include "server/wire.h"

namespace negmine::server {

uint64_t IndexVersion(const Collection& c) { return c.index->Stats().version; }

absl::StatusOr<std::shared_ptr<Collection>> CollectionRegistry::Find(
    const std::string& raw_name) const {
  absl::StatusOr<std::string> name = CollectionName(raw_name);
  if (!name.ok()) return name.status();
  absl::MutexLock lock(&mu_);
  auto it = collections_.find(*name);
  if (it == collections_.end()) {
    return absl::NotFoundError(absl::StrCat("collection '", *name, "' not found"));
  }
  return it->second;
}

std::vector<std::shared_ptr<Collection>> CollectionRegistry::List() const {
  std::vector<std::shared_ptr<Collection>> all;
  absl::MutexLock lock(&mu_);
  for (const auto& [name, c] : collections_) all.push_back(c);
  return all;
}

absl::StatusOr<std::shared_ptr<Collection>> CollectionRegistry::Make(
    const std::string& name, const IndexOptions& options) const {
  auto create = [this](const IndexOptions& o) {
    return options_.index_factory ? options_.index_factory(o) : CreateIndex(o);
  };
  absl::StatusOr<std::unique_ptr<Index>> index = create(options);
  if (!index.ok() && options.backend == Backend::kCuda && options_.allow_cpu_fallback &&
      (absl::IsFailedPrecondition(index.status()) || absl::IsUnimplemented(index.status()))) {
    Log(LogLevel::kWarning, "cuda unavailable; serving the collection on the cpu",
        {{"collection", name}, {"error", index.status().ToString()}});
    IndexOptions cpu = options;
    cpu.backend = Backend::kCpu;
    index = create(cpu);
  }
  if (!index.ok()) return index.status();
  const bool cuda = (*index)->active_backend() == Backend::kCuda;
  Log(LogLevel::kInfo, "collection index",
      {{"collection", name},
       {"backend", BackendName((*index)->active_backend())},
       {"requested", BackendName(options.backend)}});
  auto c = std::make_shared<Collection>();
  c->name = name;
  c->index = *std::move(index);
  if (options_.coalesce.max_queries > 0 && (cuda || options_.coalesce_cpu)) {
    c->coalescer = std::make_unique<SearchCoalescer>(c->index.get(), options_.coalesce);
  }
  return c;
}

absl::Status CollectionRegistry::Insert(std::shared_ptr<Collection> c,
                                        const std::function<absl::Status()>& before) {
  absl::MutexLock lock(&mu_);
  if (collections_.contains(c->name)) {
    return absl::AlreadyExistsError(absl::StrCat("collection '", c->name, "' already exists"));
  }
  if (absl::Status s = before(); !s.ok()) return s;
  const std::string name = c->name;
  collections_.emplace(name, std::move(c));
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Collection>> CollectionRegistry::Erase(
    const std::string& name, const std::function<absl::Status()>& before) {
  absl::MutexLock lock(&mu_);
  auto it = collections_.find(name);
  if (it == collections_.end()) {
    return absl::NotFoundError(absl::StrCat("collection '", name, "' not found"));
  }
  if (absl::Status s = before(); !s.ok()) return s;
  std::shared_ptr<Collection> c = it->second;
  {
    absl::MutexLock write_lock(&c->write_mu);
    c->dropped = true;
  }
  collections_.erase(it);
  return c;
}

}  // namespace negmine::server
