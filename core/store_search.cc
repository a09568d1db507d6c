// StoreIndex's search: each query's plan (core/mine_plan.h), the work units,
// the mining controls that run above the backends (the dedupe and SimANS),
// and the per-query counts.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>

#include "absl/strings/str_cat.h"
#include "core/linalg.h"
#include "core/status.h"
#include "core/store_index.h"

namespace negmine {
namespace {

float Dot(const float* a, const float* b, int dim) {
  double s = 0;
  for (int j = 0; j < dim; ++j) s += double{a[j]} * b[j];
  return static_cast<float>(s);
}

// The near-duplicate check of one query: the unit vectors it holds (its
// positives and the negatives taken), and a candidate's cosine to them.
class Deduper {
 public:
  Deduper(const PointSource& points, float threshold)
      : points_(points), threshold_(threshold), x_(points.dim) {}
  bool on() const { return threshold_ > 0; }
  void Add(uint32_t row) {
    if (!on()) return;
    Unit(row);
    held_.insert(held_.end(), x_.begin(), x_.end());
  }
  bool Duplicate(uint32_t row) {
    if (!on()) return false;
    Unit(row);
    const int dim = points_.dim;
    for (size_t h = 0; h < held_.size(); h += dim) {
      if (Dot(held_.data() + h, x_.data(), dim) >= threshold_) return true;
    }
    return false;
  }

 private:
  void Unit(uint32_t row) {
    points_.Get(row, x_.data());
    NormalizeRows(x_.data(), 1, points_.dim);
  }

  PointSource points_;
  float threshold_;
  std::vector<float> x_, held_;
};

void AddResult(QueryResult* r, uint64_t id, float score, float log_q) {
  r->ids.push_back(id);
  r->scores.push_back(score);
  r->log_q.push_back(log_q);
}

}  // namespace

absl::StatusOr<SearchResult> StoreIndex::Search(
    absl::Span<const float> queries,
    absl::Span<const std::vector<uint64_t>> exclude,
    const SearchParams& params) const {
  const int dim = options_.dim;
  if (queries.empty() || queries.size() % dim != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("queries hold ", queries.size(),
                     " floats, not a positive multiple of dim ", dim));
  }
  const size_t n = queries.size() / dim;
  if (!exclude.empty() && exclude.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("exclude has ", exclude.size(), " lists for ", n,
                     " queries; send none or one per query"));
  }
  if (!params.positives.empty() && params.positives.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("positives has ", params.positives.size(), " lists for ", n,
                     " queries; send none or one per query"));
  }
  RETURN_IF_ERROR(CheckFinite(queries, dim, "queries"));
  absl::ReaderMutexLock lock(&mu_);
  RETURN_IF_ERROR(ValidateSearchParams(params, store_.size()));
  ASSIGN_OR_RETURN(std::vector<QueryPlan> plans, PlanLocked(queries, n, exclude, params));
  const bool staged = params.filters.dedupe_cosine > 0 ||
                      (params.mode != MineMode::kTopK &&
                       params.distribution == SampleDistribution::kSimans);
  bool window = false;
  for (const QueryPlan& plan : plans) window = window || plan.window();
  std::optional<absl::StatusOr<SearchResult>> on_device;
  if (device_ && !staged && !window && params.positives.empty()) {
    on_device = DeviceSearchLocked(queries, n, exclude, params);
  }
  // The backend counts for the filters' attribution as it searches, under
  // the same lock, so that the counts are of the version searched.
  std::vector<std::vector<size_t>> above(n);
  std::vector<std::vector<size_t>>* count = window ? &above : nullptr;
  absl::StatusOr<SearchResult> result =
      on_device.has_value() ? *std::move(on_device)
      : staged              ? StagedLocked(plans, params, count)
                            : UnitsLocked(plans, params, count);
  if (!result.ok() || result->queries.size() != n) return result;
  CountLocked(plans, params, staged, above, &*result);
  return result;
}

absl::StatusOr<std::vector<QueryPlan>> StoreIndex::PlanLocked(
    absl::Span<const float> queries, size_t n,
    absl::Span<const std::vector<uint64_t>> exclude, const SearchParams& params) const {
  const int dim = options_.dim;
  const PointSource points = Points();
  const bool need_s_pos =
      params.filters.margins() || params.distribution == SampleDistribution::kSimans;
  std::vector<QueryPlan> plans(n);
  std::vector<float> x(dim);
  for (size_t i = 0; i < n; ++i) {
    QueryPlan& plan = plans[i];
    plan.query.assign(queries.begin() + i * dim, queries.begin() + (i + 1) * dim);
    double sq = 0;
    for (float v : plan.query) sq += double{v} * v;
    plan.norm = static_cast<float>(std::sqrt(sq));
    if (options_.metric == Metric::kCosine && plan.norm > 0) {
      for (float& v : plan.query) v /= plan.norm;
      plan.norm = 1;
    }
    if (!exclude.empty()) {
      for (uint64_t id : exclude[i]) {
        if (std::optional<size_t> row = store_.Row(id)) plan.excluded.push_back(*row);
      }
    }
    if (!params.positives.empty()) {
      const std::vector<uint64_t>& pos = params.positives[i];
      if (pos.empty() && need_s_pos) {
        return absl::InvalidArgumentError(absl::StrCat(
            "positives[", i, "] is empty; the margins and SIMANS need the query's positives"));
      }
      for (size_t j = 0; j < pos.size(); ++j) {
        std::optional<size_t> row = store_.Row(pos[j]);
        if (!row) {
          return absl::NotFoundError(absl::StrCat("positives[", i, "][", j, "] = ", pos[j],
                                                  " is not in the collection"));
        }
        points.Get(static_cast<uint32_t>(*row), x.data());
        plan.positive_rows.push_back(static_cast<uint32_t>(*row));
        plan.positive_scores.push_back(Dot(plan.query.data(), x.data(), dim));
        plan.s_pos = std::min(plan.s_pos, plan.positive_scores.back());
      }
    }
    std::sort(plan.excluded.begin(), plan.excluded.end());
    plan.excluded.erase(std::unique(plan.excluded.begin(), plan.excluded.end()),
                        plan.excluded.end());
    std::vector<uint32_t> pos_rows = plan.positive_rows;
    std::sort(pos_rows.begin(), pos_rows.end());
    pos_rows.erase(std::unique(pos_rows.begin(), pos_rows.end()), pos_rows.end());
    plan.num_positives = pos_rows.size();
    std::vector<uint32_t> merged;
    std::set_union(plan.excluded.begin(), plan.excluded.end(), pos_rows.begin(), pos_rows.end(),
                   std::back_inserter(merged));
    plan.num_excluded = merged.size() - plan.num_positives;
    plan.excluded = std::move(merged);
    SetWindow(params.filters, plan.s_pos, &plan);
  }
  return plans;
}

absl::StatusOr<SearchResult> StoreIndex::UnitsLocked(absl::Span<const QueryPlan> plans,
                                                     const SearchParams& params,
                                                     std::vector<std::vector<size_t>>* above) const {
  const size_t n = plans.size();
  const size_t unit = params.work_unit_queries > 0
                          ? static_cast<size_t>(params.work_unit_queries)
                          : n;
  // One unit, with its turn.
  const auto run = [&](absl::Span<const QueryPlan> part, const SearchParams& p,
                       std::vector<std::vector<size_t>>* part_above) {
    if (params.turns != nullptr) params.turns->Acquire();
    absl::StatusOr<SearchResult> r = SearchLocked(part, p, part_above);
    if (params.turns != nullptr) params.turns->Release();
    return r;
  };
  if (n <= unit) return run(plans, params, above);
  std::vector<std::vector<size_t>> unit_above;
  // Work units, one after the other under the caller's read lock: a
  // deadline stops the batch within a unit, and scratch is that of one unit.
  SearchResult all;
  all.index_version = version_;
  all.queries.reserve(n);
  SearchParams unit_params = params;
  for (size_t begin = 0; begin < n; begin += unit) {
    RETURN_IF_ERROR(CheckCancelled(params));
    const size_t m = std::min(unit, n - begin);
    unit_params.stream_offset = params.stream_offset + begin;
    unit_above.assign(m, {});
    ASSIGN_OR_RETURN(SearchResult part,
                     run(plans.subspan(begin, m), unit_params, above ? &unit_above : nullptr));
    for (QueryResult& q : part.queries) all.queries.push_back(std::move(q));
    if (above) std::move(unit_above.begin(), unit_above.end(), above->begin() + begin);
  }
  return all;
}

absl::StatusOr<QueryResult> StoreIndex::OneLocked(size_t i, const QueryPlan& plan,
                                                  const SearchParams& params) const {
  SearchParams one = params;
  one.stream_offset = params.stream_offset + i;
  ASSIGN_OR_RETURN(SearchResult r, UnitsLocked(absl::MakeConstSpan(&plan, 1), one));
  return std::move(r.queries[0]);
}

// The staged path. A top list (the rank window, the top part, SimANS's pool)
// comes from a top-k search of the eligible targets; it is walked in order:
// the rank window is skipped, then the dedupe drops what near-duplicates a
// positive or a result already taken. The draws come after: SimANS from the
// pool, or softmax draws (a search in mode kSample, excluding every target
// the walk went past) walked the same way. A list that runs out before the
// query has its results while more targets remain is fetched again, for that
// query alone, twice as long: both lists are prefixes of one ordering (top-k
// by score; the draws of a fixed stream), so this only extends the walk.
absl::StatusOr<SearchResult> StoreIndex::StagedLocked(absl::Span<const QueryPlan> plans,
                                                      const SearchParams& params,
                                                      std::vector<std::vector<size_t>>* above) const {
  const size_t n = plans.size();
  const PointSource points = Points();
  const size_t size = store_.size();
  const bool simans = params.mode != MineMode::kTopK &&
                      params.distribution == SampleDistribution::kSimans;
  const bool dedupe = params.filters.dedupe_cosine > 0;
  const size_t k = params.k;
  const size_t num_top = params.num_top();
  const size_t num_draws = params.num_samples();
  const size_t skip = params.rank_offset;
  SearchResult out;
  out.index_version = version_;
  out.queries.resize(n);

  // The top list.
  const bool need_top = num_top > 0 || simans || skip > 0;
  size_t top_len = skip + (simans ? std::max<size_t>(params.simans.candidates, num_top) : num_top);
  if (dedupe && !simans) top_len += num_top + 16;
  top_len = std::min(top_len, size);
  SearchParams tp = params;
  tp.mode = MineMode::kTopK;
  tp.k = static_cast<int>(std::max<size_t>(top_len, 1));
  tp.rank_offset = 0;
  tp.num_hard = 0;
  tp.want_log_z = false;
  SearchResult tops;
  if (need_top) {
    ASSIGN_OR_RETURN(tops, UnitsLocked(plans, tp, above));
  }
  // Walks query i's list with walk(list), which says whether the query is
  // done. While it is not and the list came back full (more targets
  // remain), the list is fetched again for query i alone, twice as long,
  // and walked again from its start.
  const auto walk_refilled = [&](size_t i, const QueryPlan& plan, const SearchParams& p,
                                 const QueryResult& first,
                                 const std::function<bool(const QueryResult&)>& walk)
      ABSL_SHARED_LOCKS_REQUIRED(mu_) -> absl::Status {
    const QueryResult* list = &first;
    std::optional<QueryResult> longer;
    size_t len = p.k;
    while (!walk(*list) && list->ids.size() >= len && len < size) {
      len = std::min(2 * len, size);
      SearchParams more = p;
      more.k = static_cast<int>(len);
      ASSIGN_OR_RETURN(longer, OneLocked(i, plan, more));
      list = &*longer;
    }
    return absl::OkStatus();
  };
  // A query's dedupe as it starts: its positives held.
  const auto fresh_dedupe = [&](size_t i) {
    Deduper d(points, params.filters.dedupe_cosine);
    for (uint32_t row : plans[i].positive_rows) d.Add(row);
    return d;
  };
  // Per query: the rows the top walk went past (excluded from the draws),
  // and the dedupe after it.
  std::vector<std::vector<uint32_t>> passed(n);
  std::vector<Deduper> dedupers;
  dedupers.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    dedupers.push_back(fresh_dedupe(i));
    if (!need_top) continue;
    QueryResult& r = out.queries[i];
    size_t pool_start = 0;
    RETURN_IF_ERROR(walk_refilled(i, plans[i], tp, tops.queries[i], [&](const QueryResult& list) {
      r = QueryResult();
      r.removed.rank_offset = std::min(skip, list.ids.size());
      passed[i].clear();
      Deduper dd = fresh_dedupe(i);
      size_t at = 0;
      for (; at < r.removed.rank_offset; ++at) passed[i].push_back(*store_.Row(list.ids[at]));
      for (; at < list.ids.size() && r.ids.size() < num_top; ++at) {
        const uint32_t row = static_cast<uint32_t>(*store_.Row(list.ids[at]));
        passed[i].push_back(row);
        if (dd.Duplicate(row)) {
          ++r.removed.dedupe;
          continue;
        }
        dd.Add(row);
        AddResult(&r, list.ids[at], list.scores[at], 0.0f);
      }
      pool_start = at;
      dedupers[i] = std::move(dd);
      // SimANS's pool is the list as fetched: no refill.
      return r.ids.size() >= num_top || !dedupe || simans;
    }));
    r.num_top = static_cast<int>(r.ids.size());
    if (simans && num_draws > 0) {
      // The pool: the top simans.candidates eligible after the rank window,
      // less the top part (and what the dedupe dropped from it).
      const QueryResult& list = tops.queries[i];
      const size_t end = std::min(list.ids.size(), skip + params.simans.candidates);
      const size_t begin = std::min(pool_start, end);
      const absl::Span<const float> pool =
          absl::MakeConstSpan(list.scores).subspan(begin, end - begin);
      const size_t want = dedupe ? pool.size() : num_draws;
      const PoolDraws draws = SimansDraws(pool, plans[i].s_pos, params.simans, want,
                                          params.with_replacement, params.seed,
                                          params.stream_offset + i);
      size_t taken = 0;
      for (size_t t = 0; t < draws.index.size() && taken < num_draws; ++t) {
        const size_t at = begin + draws.index[t];
        const uint32_t row = static_cast<uint32_t>(*store_.Row(list.ids[at]));
        if (dedupers[i].Duplicate(row)) {
          ++r.removed.dedupe;
          continue;
        }
        dedupers[i].Add(row);
        AddResult(&r, list.ids[at], list.scores[at], draws.log_q[t]);
        ++taken;
      }
    }
  }
  if (num_draws > 0 && !simans) {
    // Softmax draws, excluding what the walk went past.
    std::vector<QueryPlan> rest(plans.begin(), plans.end());
    for (size_t i = 0; i < n; ++i) {
      std::vector<uint32_t> rows = passed[i];
      std::sort(rows.begin(), rows.end());
      std::vector<uint32_t> merged;
      std::set_union(rest[i].excluded.begin(), rest[i].excluded.end(), rows.begin(), rows.end(),
                     std::back_inserter(merged));
      rest[i].excluded = std::move(merged);
    }
    SearchParams sp = params;
    sp.mode = MineMode::kSample;
    sp.num_hard = 0;
    sp.rank_offset = 0;  // the walk skipped the rank window
    sp.want_log_z = false;
    sp.k = static_cast<int>(std::min(dedupe ? 2 * num_draws + 8 : num_draws, size));
    // (The counts come with the first backend call, over the plans as given.)
    std::vector<std::vector<size_t>> rest_above(n);
    ASSIGN_OR_RETURN(SearchResult drawn,
                     UnitsLocked(rest, sp, need_top || !above ? nullptr : &rest_above));
    if (!need_top && above) {
      // The walk's exclusions are empty here (no top list), so rest == plans.
      *above = std::move(rest_above);
    }
    for (size_t i = 0; i < n; ++i) {
      QueryResult& r = out.queries[i];
      const size_t head = r.ids.size(), head_dedupe = r.removed.dedupe;
      RETURN_IF_ERROR(walk_refilled(i, rest[i], sp, drawn.queries[i], [&](const QueryResult& list) {
        r.ids.resize(head);
        r.scores.resize(head);
        r.log_q.resize(head);
        r.removed.dedupe = head_dedupe;
        Deduper dd = dedupers[i];
        for (size_t t = 0; t < list.ids.size() && r.ids.size() < k; ++t) {
          const uint32_t row = static_cast<uint32_t>(*store_.Row(list.ids[t]));
          if (dd.Duplicate(row)) {
            ++r.removed.dedupe;
            continue;
          }
          dd.Add(row);
          AddResult(&r, list.ids[t], list.scores[t], list.log_q[t]);
        }
        return r.ids.size() >= k || !dedupe;
      }));
    }
  }
  if (params.want_log_z) {
    // log Z over the eligible targets: the rank window out, the top part in.
    SearchParams zp = params;
    zp.mode = MineMode::kTopK;
    zp.k = 1;
    zp.num_hard = 0;
    ASSIGN_OR_RETURN(SearchResult z, UnitsLocked(plans, zp));
    for (size_t i = 0; i < n; ++i) {
      out.queries[i].log_z_lo = z.queries[i].log_z_lo;
      out.queries[i].log_z_hi = z.queries[i].log_z_hi;
    }
  }
  return out;
}

void StoreIndex::CountLocked(absl::Span<const QueryPlan> plans, const SearchParams& params,
                             bool staged, const std::vector<std::vector<size_t>>& above,
                             SearchResult* result) const {
  const size_t n = plans.size();
  for (size_t i = 0; i < n; ++i) {
    QueryResult& r = result->queries[i];
    const QueryPlan& plan = plans[i];
    const size_t candidates = store_.size() - plan.excluded.size();
    r.removed.excluded = plan.num_excluded;
    r.removed.positives = plan.num_positives;
    r.num_eligible = plan.count_above.empty()
                         ? candidates
                         : AttributeRemoved(params.filters, plan.s_pos, plan, above[i],
                                            candidates, &r.removed);
    // (The staged path counted what its walk skipped.)
    if (!staged) r.removed.rank_offset = std::min<size_t>(params.rank_offset, r.num_eligible);
    r.positive_scores = plan.positive_scores;
    r.shortfall = Shortfall(r, params);
  }
}

}  // namespace negmine
