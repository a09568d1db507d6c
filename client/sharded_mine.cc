// ShardedClient::Mine: fan-out and the exact merges (docs/SHARDING.md).
//   top-k: sort the union of the shards' top (rank_offset + k).
//   with replacement: slot j's shard is the first s with
//     sum_{t<=s} Z_t > u_j sum_t Z_t (u_j a client uniform), decided by
//     interval arithmetic on the certified log Z intervals, tightened while
//     undecided; the slot takes that shard's next i.i.d. draw.
//   without replacement: each shard's ordered sample gets Gumbel keys
//     re-simulated from its mass (first ~ Gumbel(log Z_s), then truncated
//     Gumbels with the drawn mass removed); the m largest keys over all
//     shards are a sample without replacement from the union.
#include <algorithm>
#include <cmath>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <random>

#include "absl/strings/str_cat.h"
#include "client/sharded_client.h"

namespace negmine::client {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kProposalLogZWidth = 0.5;
constexpr double kDefaultLogZWidth = 1e-2;
constexpr double kMinLogZWidth = 1e-12;
using Clock = std::chrono::steady_clock;

double LogSumExp(const std::vector<double>& x) {
  double top = -kInf;
  for (double v : x) top = std::max(top, v);
  if (!std::isfinite(top)) return top;
  double sum = 0;
  for (double v : x) sum += std::exp(v - top);
  return top + std::log(sum);
}

double Mid(double lo, double hi) {
  if (std::isfinite(lo) && std::isfinite(hi)) return 0.5 * (lo + hi);
  return std::isfinite(hi) ? hi : lo;
}

std::vector<double> ShardKeys(const std::vector<double>& log_w, double log_mass,
                              const std::vector<double>& gumbel) {
  std::vector<double> keys(log_w.size(), -kInf);
  if (log_w.empty() || !std::isfinite(log_mass)) return keys;
  double prev = log_mass + gumbel[0];
  keys[0] = prev;
  double drawn = 0;
  for (size_t j = 1; j < log_w.size(); ++j) {
    drawn += std::exp(log_w[j - 1] - log_mass);
    const double left = 1.0 - drawn;
    double cur = -kInf;
    if (left > 0 && std::isfinite(prev)) {
      const double phi = log_mass + std::log(left);
      const double a = -prev, b = -(phi + gumbel[j]);  // -log(e^a + e^b)
      const double m = std::max(a, b);
      cur = -(m + std::log(std::exp(a - m) + std::exp(b - m)));
    }
    keys[j] = cur;
    prev = cur;
  }
  return keys;
}

double Gumbel(std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(1e-300, 1.0);
  return -std::log(-std::log(u(rng)));
}

uint64_t ShardSeed(uint64_t seed, int shard, int attempt) {
  const uint64_t v = Mix64(seed ^ Mix64(uint64_t(shard) * 1000003ULL + attempt + 1));
  return v == 0 ? 1 : v;
}

struct Item {
  double score;
  uint64_t id;
};

}  // namespace

absl::StatusOr<ShardedMineResult> ShardedClient::Mine(
    const std::string& collection, absl::Span<const float> queries, uint32_t dim,
    const v1::MineParams& params, absl::Span<const std::vector<uint64_t>> exclude,
    const ShardedMineOptions& options) {
  if (dim == 0 || queries.size() % dim != 0 || queries.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "queries has ", queries.size(), " floats: not a positive multiple of dim = ", dim));
  }
  const size_t n = queries.size() / dim;
  if (!exclude.empty() && exclude.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("exclude has ", exclude.size(), " lists for ", n, " queries"));
  }
  const v1::MineMode mode =
      params.mode() == v1::MINE_MODE_UNSPECIFIED ? v1::MINE_MODE_TOP_K : params.mode();
  const bool sampling = mode != v1::MINE_MODE_TOP_K;
  const int k = static_cast<int>(params.k());
  const int hard = mode == v1::MINE_MODE_MIXED ? static_cast<int>(params.num_hard()) : 0;
  const int offset = static_cast<int>(params.rank_offset());
  if (k < 1 || hard > k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.k = ", k, ", params.num_hard = ", hard, ": need k >= 1 and num_hard <= k"));
  }
  if ((sampling || params.return_log_z()) &&
      !(params.temperature() > 0 && std::isfinite(params.temperature()))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.temperature = ", params.temperature(), " must be finite and > 0"));
  }
  const bool exact_sampler = params.sampler() == v1::SAMPLER_EXACT;
  const bool partial = options.allow_partial.value_or(options_.allow_partial);
  const auto deadline = Deadline();
  std::mt19937_64 rng(params.seed() != 0 ? params.seed() : std::random_device{}());
  const uint64_t call_seed = params.seed() != 0 ? params.seed() : (rng() | 1);

  std::shared_lock<std::shared_mutex> gate(gate_);
  const int S = num_shards();
  std::vector<bool> down(S, false);
  absl::StatusOr<std::vector<int64_t>> sizes_or = Sizes(collection, deadline, partial, &down);
  if (!sizes_or.ok()) return sizes_or.status();
  std::vector<int64_t> sizes = *sizes_or;
  std::vector<uint64_t> mins = options.read_your_writes ? Versions(collection)
                                                        : std::vector<uint64_t>(S, 0);
  for (size_t s = 0; s < options.min_versions.size() && s < mins.size(); ++s) {
    mins[s] = std::max(mins[s], options.min_versions[s]);
  }
  std::vector<int64_t> answered(S, -1);

  using Excl = std::vector<std::vector<uint64_t>>;
  auto sub_batch = [&](const std::vector<size_t>& rows, const Excl& excl,
                       std::vector<float>* q, Excl* e) {
    for (size_t i : rows) {
      q->insert(q->end(), queries.begin() + i * dim, queries.begin() + (i + 1) * dim);
      if (!excl.empty()) e->push_back(excl[i]);
    }
  };
  // One call to shard s for `rows` (all when empty) asking `want` results.
  auto call = [&](int s, int want, v1::MineParams p, const Excl& excl,
                  const std::vector<size_t>& rows) -> absl::StatusOr<v1::MineResponse> {
    std::vector<float> q;
    Excl e;
    const bool all = rows.empty();
    if (!all) sub_batch(rows, excl, &q, &e);
    const size_t count = all ? n : rows.size();
    for (int attempt = 0; attempt < 2; ++attempt) {
      const int64_t k_s = std::min<int64_t>(want, std::max<int64_t>(sizes[s], 0));
      if (k_s == 0) {
        std::vector<bool> only(S, true);
        only[s] = false;
        auto fresh = Sizes(collection, deadline, false, &only, s);
        if (!fresh.ok()) return fresh.status();
        sizes[s] = (*fresh)[s];
        if (sizes[s] > 0 && attempt == 0) continue;
        v1::MineResponse empty;
        for (size_t i = 0; i < count; ++i) {
          v1::QueryNegatives* r = empty.add_results();
          r->set_log_z_lo(-kInf);
          r->set_log_z_hi(-kInf);
        }
        return empty;
      }
      p.set_k(static_cast<uint32_t>(k_s));
      v1::MineRequest req;
      BuildMineRequest(collection, all ? queries : absl::Span<const float>(q), dim, p,
                       all ? excl : e, &req);
      req.set_min_index_version(mins[s]);
      auto r = ShardFor(s, deadline)->Mine(req);
      if (!r.ok()) return r;
      bool stale = false;
      if (k_s < want) {
        for (const auto& res : r->results()) stale |= res.num_eligible() > uint64_t(k_s);
      }
      if (stale && attempt == 0) {
        std::vector<bool> only(S, true);
        only[s] = false;
        auto fresh = Sizes(collection, deadline, false, &only, s);
        if (!fresh.ok()) return fresh.status();
        sizes[s] = (*fresh)[s];
        continue;  // the shard grew since its size was read
      }
      return r;
    }
    return absl::InternalError("unreachable");
  };
  // Every live shard, in parallel.
  auto ask = [&](int want, const v1::MineParams& p, const Excl& excl, bool seeded)
      -> absl::StatusOr<std::map<int, v1::MineResponse>> {
    std::vector<std::future<absl::StatusOr<v1::MineResponse>>> futures(S);
    for (int s = 0; s < S; ++s) {
      if (down[s]) continue;
      v1::MineParams ps = p;
      if (seeded) ps.set_seed(ShardSeed(call_seed, s, 0));
      futures[s] = std::async(std::launch::async, [&, s, ps] {
        return call(s, want, ps, excl, {});
      });
    }
    std::map<int, v1::MineResponse> out;
    absl::Status first;
    for (int s = 0; s < S; ++s) {
      if (down[s]) continue;
      auto r = futures[s].get();
      if (!r.ok()) {
        if (IsDown(r.status()) && partial) {
          down[s] = true;
        } else if (first.ok()) {
          first = ShardError(s, r.status());
        }
        continue;
      }
      answered[s] = static_cast<int64_t>(r->index_version());
      out[s] = std::move(*r);
    }
    if (!first.ok()) return first;
    if (out.empty()) return absl::UnavailableError("no shard answered");
    return out;
  };

  Excl lists(exclude.begin(), exclude.end());
  ShardedMineResult result;
  std::vector<v1::QueryNegatives> merged(n);
  std::vector<uint64_t> eligible(n, 0);
  bool have_eligible = false;
  Excl excl2 = lists;

  // 1. The global top: the answer in TOP_K mode; in MIXED the hard part and,
  //    with the rank window, what the sampled part must not contain.
  if (!sampling || hard + offset > 0) {
    const int kt = sampling ? hard : k;
    v1::MineParams p = params;
    p.set_mode(v1::MINE_MODE_TOP_K);
    p.set_rank_offset(0);
    p.set_return_log_z(params.return_log_z() && !sampling);
    auto parts = ask(offset + kt, p, lists, false);
    if (!parts.ok()) return parts.status();
    if (sampling && excl2.empty()) excl2.assign(n, {});
    for (size_t i = 0; i < n; ++i) {
      std::vector<Item> items;
      std::vector<double> lo, hi;
      for (const auto& [s, r] : *parts) {
        const v1::QueryNegatives& q = r.results(i);
        for (int j = 0; j < q.ids_size(); ++j) items.push_back({q.scores(j), q.ids(j)});
        eligible[i] += q.num_eligible();
        lo.push_back(q.log_z_lo());
        hi.push_back(q.log_z_hi());
      }
      std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
        return a.score != b.score ? a.score > b.score : a.id < b.id;
      });
      const int end = std::min<int>(items.size(), offset + kt);
      for (int j = 0; j < end; ++j) {
        if (j >= offset) {
          merged[i].add_ids(items[j].id);
          merged[i].add_scores(static_cast<float>(items[j].score));
          merged[i].add_log_q(0.0f);
        }
        if (sampling) excl2[i].push_back(items[j].id);
      }
      merged[i].set_num_top(merged[i].ids_size());
      if (p.return_log_z()) {
        merged[i].set_log_z_lo(LogSumExp(lo));
        merged[i].set_log_z_hi(LogSumExp(hi));
      }
    }
    have_eligible = true;
  }

  // 2. Samples from what is left.
  const int m = sampling ? k - hard : 0;
  if (m > 0) {
    const double width0 = params.log_z_width() > 0 ? params.log_z_width()
                          : exact_sampler          ? kDefaultLogZWidth
                                                   : kProposalLogZWidth;
    v1::MineParams p = params;
    p.set_mode(v1::MINE_MODE_SAMPLE);
    p.set_num_hard(0);
    p.set_rank_offset(0);
    p.set_return_log_z(true);
    p.set_log_z_width(width0);
    auto parts_or = ask(m, p, excl2, true);
    if (!parts_or.ok()) return parts_or.status();
    std::map<int, v1::MineResponse>& parts = *parts_or;
    std::vector<int> order;
    for (const auto& [s, r] : parts) order.push_back(s);
    const int P = static_cast<int>(order.size());
    const double inv_tau = 1.0 / params.temperature();
    std::vector<double> widths(P, width0);
    auto lo_of = [&](int j, size_t i) {
      const double v = parts[order[j]].results(i).log_z_lo();
      return std::isnan(v) ? -kInf : v;
    };
    auto hi_of = [&](int j, size_t i) {
      const double v = parts[order[j]].results(i).log_z_hi();
      return std::isnan(v) ? -kInf : v;
    };
    auto bound = [&](int j, size_t i, bool high) {
      if (!exact_sampler) return Mid(lo_of(j, i), hi_of(j, i));
      return high ? hi_of(j, i) : lo_of(j, i);
    };
    // Narrower intervals for the (part, query) pairs marked; false when all
    // are at the floor.
    auto tighten = [&](const std::vector<std::vector<size_t>>& rows) -> absl::StatusOr<bool> {
      bool progressed = false;
      for (int j = 0; j < P; ++j) {
        if (rows[j].empty() || widths[j] <= kMinLogZWidth) continue;
        widths[j] = std::max(kMinLogZWidth, widths[j] / 100);
        v1::MineParams t;
        t.set_mode(v1::MINE_MODE_TOP_K);
        t.set_temperature(params.temperature());
        t.set_return_log_z(true);
        t.set_log_z_width(widths[j]);
        auto r = call(order[j], 1, t, excl2, rows[j]);
        if (!r.ok()) return ShardError(order[j], r.status());
        for (size_t t_i = 0; t_i < rows[j].size(); ++t_i) {
          v1::QueryNegatives* q = parts[order[j]].mutable_results(rows[j][t_i]);
          q->set_log_z_lo(std::max(q->log_z_lo(), r->results(t_i).log_z_lo()));
          q->set_log_z_hi(std::min(q->log_z_hi(), r->results(t_i).log_z_hi()));
        }
        progressed = true;
      }
      return progressed;
    };
    // Per query: the (part, position) of each merged draw.
    std::vector<std::vector<std::pair<int, int>>> picks(n);
    if (params.with_replacement()) {
      std::uniform_real_distribution<double> unif(0.0, 1.0);
      std::vector<std::vector<double>> u(n, std::vector<double>(m));
      for (auto& row : u) for (double& x : row) x = unif(rng);
      std::vector<std::vector<int>> alloc(n, std::vector<int>(m, -1));
      for (int round = 0;; ++round) {
        std::vector<std::vector<size_t>> amb(P);
        for (size_t i = 0; i < n; ++i) {
          std::vector<double> zl(P), zh(P);
          double top = -kInf;
          for (int j = 0; j < P; ++j) top = std::max(top, bound(j, i, true));
          if (!std::isfinite(top)) {
            alloc[i].assign(m, -2);  // nothing eligible
            continue;
          }
          for (int j = 0; j < P; ++j) {
            zl[j] = std::exp(bound(j, i, false) - top);
            zh[j] = std::exp(bound(j, i, true) - top);
          }
          bool undecided = false;
          for (int t = 0; t < m; ++t) {
            const double x = u[i][t];
            double left_lo = 0, left_hi = 0, right_lo = 0, right_hi = 0;
            for (int j = 0; j < P; ++j) right_lo += zl[j], right_hi += zh[j];
            int chosen = -1;
            for (int j = 0; j < P; ++j) {
              left_lo += zl[j], left_hi += zh[j];
              right_lo = std::max(0.0, right_lo - zl[j]);
              right_hi = std::max(0.0, right_hi - zh[j]);
              if (x * right_hi < (1 - x) * left_lo) { chosen = j; break; }  // surely here
              if (!(x * right_lo >= (1 - x) * left_hi)) break;  // not surely past
            }
            alloc[i][t] = chosen;
            undecided |= chosen < 0;
          }
          if (undecided) {
            for (int j = 0; j < P; ++j) {
              if (lo_of(j, i) < hi_of(j, i)) amb[j].push_back(i);
            }
          }
        }
        bool any = false;
        for (const auto& a : amb) any |= !a.empty();
        if (!any || !exact_sampler) break;
        auto progressed = tighten(amb);
        if (!progressed.ok()) return progressed.status();
        if (!*progressed) break;
      }
      // Undecided at the floor: the midpoints decide.
      for (size_t i = 0; i < n; ++i) {
        bool undecided = false;
        for (int t = 0; t < m; ++t) {
          if (alloc[i][t] != -1) continue;
          undecided = true;
          std::vector<double> mid(P);
          for (int j = 0; j < P; ++j) mid[j] = Mid(lo_of(j, i), hi_of(j, i));
          const double total = LogSumExp(mid);
          double acc = 0;
          alloc[i][t] = P - 1;
          for (int j = 0; j < P; ++j) {
            acc += std::exp(mid[j] - total);
            if (u[i][t] * 1.0 < acc) { alloc[i][t] = j; break; }
          }
        }
        result.unresolved += undecided;
      }
      // More draws where a shard got more slots than it returned.
      for (int j = 0; j < P; ++j) {
        v1::MineResponse& r = parts[order[j]];
        for (int attempt = 1; attempt < 50; ++attempt) {
          std::vector<size_t> short_rows;
          for (size_t i = 0; i < n; ++i) {
            const int need = std::count(alloc[i].begin(), alloc[i].end(), j);
            if (need > r.results(i).ids_size()) short_rows.push_back(i);
          }
          if (short_rows.empty()) break;
          v1::MineParams more = p;
          more.set_return_log_z(false);
          more.set_seed(ShardSeed(call_seed, order[j], attempt));
          auto extra = call(order[j], m, more, excl2, short_rows);
          if (!extra.ok()) return ShardError(order[j], extra.status());
          for (size_t t = 0; t < short_rows.size(); ++t) {
            v1::QueryNegatives* q = r.mutable_results(short_rows[t]);
            const v1::QueryNegatives& e = extra->results(t);
            if (e.ids_size() == 0) {
              return absl::UnavailableError(absl::StrCat(Name(order[j]),
                                                         " returned no draws"));
            }
            for (int x = 0; x < e.ids_size(); ++x) {
              q->add_ids(e.ids(x));
              q->add_scores(e.scores(x));
              q->add_log_q(e.log_q(x));
            }
          }
        }
      }
      for (size_t i = 0; i < n; ++i) {
        std::vector<int> next(P, 0);
        for (int t = 0; t < m; ++t) {
          const int j = alloc[i][t];
          if (j < 0) continue;
          picks[i].push_back({j, next[j]++});
        }
      }
    } else {
      std::vector<std::vector<std::vector<double>>> gum(P, std::vector<std::vector<double>>(n));
      for (int j = 0; j < P; ++j) {
        for (size_t i = 0; i < n; ++i) {
          gum[j][i].resize(parts[order[j]].results(i).ids_size());
          for (double& g : gum[j][i]) g = Gumbel(rng);
        }
      }
      for (int round = 0;; ++round) {
        std::vector<std::vector<size_t>> amb(P);
        for (size_t i = 0; i < n; ++i) {
          struct Key { double lo, hi, mid; int part, pos; };
          std::vector<Key> keys;
          for (int j = 0; j < P; ++j) {
            const v1::QueryNegatives& q = parts[order[j]].results(i);
            const double mlo = bound(j, i, false), mhi = bound(j, i, true);
            std::vector<double> wlo(q.ids_size()), whi(q.ids_size());
            for (int x = 0; x < q.ids_size(); ++x) {
              if (exact_sampler) {
                wlo[x] = whi[x] = double{q.scores(x)} * inv_tau;
              } else {
                wlo[x] = double{q.log_q(x)} + mlo;
                whi[x] = double{q.log_q(x)} + mhi;
              }
            }
            const auto klo = ShardKeys(wlo, mlo, gum[j][i]);
            const auto khi = ShardKeys(whi, mhi, gum[j][i]);
            for (int x = 0; x < q.ids_size(); ++x) {
              const double md = Mid(klo[x], khi[x]);
              if (std::isfinite(md)) keys.push_back({klo[x], khi[x], md, j, x});
            }
          }
          std::sort(keys.begin(), keys.end(),
                    [](const Key& a, const Key& b) { return a.mid > b.mid; });
          picks[i].clear();
          for (int t = 0; t < std::min<int>(m, keys.size()); ++t) {
            picks[i].push_back({keys[t].part, keys[t].pos});
          }
          if (!exact_sampler || P < 2) continue;
          double threshold = -kInf;
          if (static_cast<int>(keys.size()) > m) {
            std::vector<double> los;
            for (const Key& key : keys) los.push_back(key.lo);
            std::nth_element(los.begin(), los.begin() + (m - 1), los.end(), std::greater<>());
            threshold = los[m - 1];
          }
          std::vector<const Key*> cand;
          for (const Key& key : keys) if (key.hi >= threshold) cand.push_back(&key);
          std::vector<bool> mark(P, false);
          for (size_t a = 0; a < cand.size(); ++a) {
            for (size_t b = a + 1; b < cand.size(); ++b) {
              if (cand[a]->part != cand[b]->part && cand[a]->lo < cand[b]->hi &&
                  cand[b]->lo < cand[a]->hi) {
                mark[cand[a]->part] = mark[cand[b]->part] = true;
              }
            }
          }
          for (int j = 0; j < P; ++j) if (mark[j]) amb[j].push_back(i);
        }
        bool any = false;
        for (const auto& a : amb) any |= !a.empty();
        if (!any || !exact_sampler) break;
        auto progressed = tighten(amb);
        if (!progressed.ok()) return progressed.status();
        if (!*progressed) {
          std::vector<bool> q_amb(n, false);
          for (const auto& a : amb) for (size_t i : a) q_amb[i] = true;
          result.unresolved += std::count(q_amb.begin(), q_amb.end(), true);
          break;
        }
      }
    }
    // Gather with the global log q.
    for (size_t i = 0; i < n; ++i) {
      std::vector<double> mid(P), lo(P), hi(P);
      for (int j = 0; j < P; ++j) {
        lo[j] = lo_of(j, i);
        hi[j] = hi_of(j, i);
        mid[j] = Mid(lo[j], hi[j]);
        if (!have_eligible) eligible[i] += parts[order[j]].results(i).num_eligible();
      }
      const double log_total = LogSumExp(mid);
      for (const auto& [j, x] : picks[i]) {
        const v1::QueryNegatives& q = parts[order[j]].results(i);
        merged[i].add_ids(q.ids(x));
        merged[i].add_scores(q.scores(x));
        merged[i].add_log_q(static_cast<float>(
            exact_sampler ? double{q.scores(x)} * inv_tau - log_total
                          : double{q.log_q(x)} + mid[j] - log_total));
      }
      if (params.return_log_z()) {
        merged[i].set_log_z_lo(LogSumExp(lo));
        merged[i].set_log_z_hi(LogSumExp(hi));
      }
    }
  }

  uint64_t min_version = std::numeric_limits<uint64_t>::max();
  for (int s = 0; s < S; ++s) {
    if (answered[s] >= 0) min_version = std::min<uint64_t>(min_version, answered[s]);
  }
  result.response.set_index_version(min_version == std::numeric_limits<uint64_t>::max()
                                        ? 0 : min_version);
  for (size_t i = 0; i < n; ++i) {
    merged[i].set_num_eligible(eligible[i]);
    *result.response.add_results() = std::move(merged[i]);
  }
  double total = 0, covered = 0, known = 0;
  int known_count = 0;
  for (int s = 0; s < S; ++s) {
    if (sizes[s] >= 0) known += sizes[s], ++known_count;
  }
  const double mean = known_count ? known / known_count : 1.0;
  for (int s = 0; s < S; ++s) {
    const double size = sizes[s] >= 0 ? sizes[s] : mean;
    total += size;
    if (!down[s]) covered += size;
    if (down[s]) result.missing_shards.push_back(s);
  }
  result.coverage = total > 0 ? covered / total : 1.0;
  result.shard_versions = answered;
  return result;
}

}  // namespace negmine::client
