#include "server/coalescer.h"

#include <optional>

#include "absl/strings/str_cat.h"

namespace negmine::server {

struct SearchCoalescer::Pending {
  absl::Span<const float> queries;
  size_t n = 0;
  absl::Span<const std::vector<uint64_t>> exclude;
  const SearchParams* params = nullptr;
  bool taken = false;  // in a batch; its result is coming
  std::optional<absl::StatusOr<SearchResult>> result;
};

absl::StatusOr<SearchResult> SearchCoalescer::Search(
    absl::Span<const float> queries, absl::Span<const std::vector<uint64_t>> exclude,
    const SearchParams& params) {
  const int dim = index_->options().dim;
  const size_t n = queries.size() / dim;
  if (options_.max_queries == 0 || params.mode != MineMode::kTopK || n == 0 ||
      !params.positives.empty() ||
      n >= options_.max_queries || queries.size() % dim != 0 ||
      (!exclude.empty() && exclude.size() != n) || !CheckFinite(queries, dim, "queries").ok()) {
    // Alone: not mergeable, big enough, or bad (the index names the error).
    return index_->Search(queries, exclude, params);
  }
  Pending me{.queries = queries, .n = n, .exclude = exclude, .params = &params};
  absl::MutexLock lock(&mu_);
  queue_.push_back(&me);
  queued_queries_ += n;
  while (!me.result.has_value()) {
    if (forming_ || me.taken) {
      // A leader is gathering, or this request is in a running batch: wait
      // for the result, or to lead the next batch.
      auto cond = [this, &me]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return me.result.has_value() || (!forming_ && !me.taken);
      };
      mu_.Await(absl::Condition(&cond));
      continue;
    }
    // Lead: gather until the batch is full, or the latency budget is spent
    // and the previous batch is done.
    forming_ = true;
    const absl::Time deadline = absl::Now() + options_.max_delay;
    auto full = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return queued_queries_ >= options_.max_queries;
    };
    while (!full()) {
      if (running_) {
        auto cond = [this, &full]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          return full() || !running_;
        };
        mu_.Await(absl::Condition(&cond));
      } else if (absl::Now() < deadline) {
        mu_.AwaitWithDeadline(absl::Condition(&full), deadline);
      } else {
        break;
      }
    }
    // The batch: the oldest request and every compatible one after it, up
    // to max_queries (the oldest always fits).
    std::vector<Pending*> members;
    size_t total = 0;
    const SearchParams& first = *queue_.front()->params;
    for (auto it = queue_.begin(); it != queue_.end();) {
      Pending* p = *it;
      if (p->params->Spec() == first.Spec() &&
          (members.empty() || total + p->n <= options_.max_queries)) {
        members.push_back(p);
        total += p->n;
        p->taken = true;
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    queued_queries_ -= total;
    forming_ = false;
    running_ = true;
    mu_.Unlock();
    std::vector<absl::StatusOr<SearchResult>> results = RunBatch(members);
    mu_.Lock();
    for (size_t i = 0; i < members.size(); ++i) members[i]->result = std::move(results[i]);
    running_ = false;
  }
  return *std::move(me.result);
}

std::vector<absl::StatusOr<SearchResult>> SearchCoalescer::RunBatch(
    const std::vector<Pending*>& members) {
  batches_.fetch_add(1);
  merged_requests_.fetch_add(members.size());
  std::vector<absl::StatusOr<SearchResult>> out;
  auto alone = [&] {
    out.clear();
    for (Pending* p : members) out.push_back(index_->Search(p->queries, p->exclude, *p->params));
  };
  if (members.size() == 1) {
    alone();
    return out;
  }
  std::vector<float> queries;
  std::vector<std::vector<uint64_t>> exclude;
  bool any_exclude = false;
  for (Pending* p : members) any_exclude = any_exclude || !p->exclude.empty();
  for (Pending* p : members) {
    queries.insert(queries.end(), p->queries.begin(), p->queries.end());
    if (!any_exclude) continue;
    if (p->exclude.empty()) {
      exclude.resize(exclude.size() + p->n);
    } else {
      exclude.insert(exclude.end(), p->exclude.begin(), p->exclude.end());
    }
  }
  SearchParams params = *members.front()->params;
  // The merged search stops only when every member is cancelled.
  params.cancelled = [&members] {
    for (Pending* p : members) {
      if (!p->params->cancelled || !p->params->cancelled()) return false;
    }
    return true;
  };
  absl::StatusOr<SearchResult> merged = index_->Search(queries, exclude, params);
  if (!merged.ok()) {
    // A request the index refuses (say, k above the collection's size)
    // must fail alone: each runs by itself for its own status.
    if (absl::IsInvalidArgument(merged.status()) ||
        absl::IsFailedPrecondition(merged.status())) {
      alone();
    } else {
      out.assign(members.size(), merged.status());
    }
    return out;
  }
  size_t offset = 0;
  for (Pending* p : members) {
    if (p->params->cancelled && p->params->cancelled()) {
      out.push_back(absl::CancelledError("the call was cancelled; its search stopped"));
    } else {
      SearchResult r;
      r.index_version = merged->index_version;
      r.queries.assign(std::make_move_iterator(merged->queries.begin() + offset),
                       std::make_move_iterator(merged->queries.begin() + offset + p->n));
      out.push_back(std::move(r));
    }
    offset += p->n;
  }
  return out;
}

}  // namespace negmine::server
