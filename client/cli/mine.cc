// mine: one Mine call, or a MineStream of requests that fit the server's
// limits, with the results in query order on stdout or in .npy files.
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/types/span.h"
#include "client/cli/commands.h"
#include "client/cli/progress.h"
#include "client/npy.h"
#include "core/store/drift_bench.h"

namespace negmine::client::cli {
namespace {

// A float as a JSON number; null for nan and the infinities, which JSON
// cannot hold.
std::string JsonNumber(double v) {
  return std::isfinite(v) ? absl::StrCat(v) : "null";
}

template <typename Repeated>
std::string JsonArray(const Repeated& values) {
  std::string out = "[";
  bool first = true;
  for (const auto& v : values) {
    absl::StrAppend(&out, first ? "" : ", ");
    if constexpr (std::is_floating_point_v<std::decay_t<decltype(v)>>) {
      out += JsonNumber(v);
    } else {
      absl::StrAppend(&out, v);
    }
    first = false;
  }
  return out + "]";
}

// A JSON string literal (quotes, backslashes and control characters escaped).
std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      absl::StrAppend(&out, absl::StrFormat("\\u%04x", ch));
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

void PrintTable(const v1::MineResponse& r, size_t first_query, bool log_z) {
  for (int qi = 0; qi < r.results_size(); ++qi) {
    const v1::QueryNegatives& q = r.results(qi);
    std::printf("\nquery %zu", first_query + qi);
    if (log_z) {
      std::printf("   log Z in [%.6f, %.6f]", q.log_z_lo(), q.log_z_hi());
    }
    if (q.positive_scores_size() > 0) {
      std::printf("   positive scores");
      for (float s : q.positive_scores()) std::printf(" %.4f", s);
    }
    std::printf("\n  %4s  %-8s %20s %9s %10s\n", "rank", "kind", "target id", "score", "log q");
    for (int i = 0; i < q.ids_size(); ++i) {
      const bool top = static_cast<uint32_t>(i) < q.num_top();
      std::printf("  %4d  %-8s %20" PRIu64 " %9.4f %10s\n", i + 1,
                  top ? "top-k" : "sample", q.ids(i), q.scores(i),
                  top ? "-" : absl::StrCat(absl::SixDigits(q.log_q(i))).c_str());
    }
    if (!q.shortfall().empty()) std::printf("  shortfall: %s\n", q.shortfall().c_str());
  }
}

void PrintJson(const v1::MineResponse& r, size_t first_query, bool log_z) {
  for (int qi = 0; qi < r.results_size(); ++qi) {
    const v1::QueryNegatives& q = r.results(qi);
    std::string line = absl::StrCat("{\"query\": ", first_query + qi, ", \"ids\": [");
    for (int i = 0; i < q.ids_size(); ++i) absl::StrAppend(&line, i ? ", " : "", q.ids(i));
    line += "], \"scores\": [";
    for (int i = 0; i < q.scores_size(); ++i) absl::StrAppend(&line, i ? ", " : "", q.scores(i));
    line += "], \"log_q\": [";
    for (int i = 0; i < q.log_q_size(); ++i) absl::StrAppend(&line, i ? ", " : "", q.log_q(i));
    absl::StrAppend(&line, "], \"num_top\": ", q.num_top());
    if (log_z) {
      absl::StrAppend(&line, absl::StrFormat(", \"log_z_lo\": %.9g, \"log_z_hi\": %.9g",
                                             q.log_z_lo(), q.log_z_hi()));
    }
    absl::StrAppend(&line, ", \"index_version\": ", r.index_version(), "}");
    std::printf("%s\n", line.c_str());
  }
}

// The output formats of --format. kTable and kJson are the readable table
// and --json's objects; the others are for trainers.
enum class Format { kTable, kJson, kJsonl, kTevatron, kStNtuple, kStTriplet };

// --format jsonl: everything the server said about one query, one object
// per line.
void PrintJsonl(const v1::MineResponse& r, size_t first_query, bool log_z,
                const std::vector<std::vector<uint64_t>>& positives) {
  for (int qi = 0; qi < r.results_size(); ++qi) {
    const v1::QueryNegatives& q = r.results(qi);
    const size_t row = first_query + qi;
    const v1::FilterCounts& f = q.removed();
    std::string line = absl::StrCat(
        "{\"query\": ", row, ", \"positive_ids\": ",
        JsonArray(positives.empty() ? std::vector<uint64_t>{} : positives[row]),
        ", \"positive_scores\": ", JsonArray(q.positive_scores()), ", \"ids\": ",
        JsonArray(q.ids()), ", \"scores\": ", JsonArray(q.scores()), ", \"log_q\": ",
        JsonArray(q.log_q()), ", \"num_top\": ", q.num_top(), ", \"count\": ", q.ids_size(),
        ", \"num_eligible\": ", q.num_eligible());
    absl::StrAppend(&line, ", \"removed\": {\"excluded\": ", f.excluded(),
                    ", \"positives\": ", f.positives(), ", \"max_score\": ", f.max_score(),
                    ", \"min_score\": ", f.min_score(), ", \"absolute_margin\": ",
                    f.absolute_margin(), ", \"relative_margin\": ", f.relative_margin(),
                    ", \"rank_offset\": ", f.rank_offset(), ", \"dedupe\": ", f.dedupe(), "}");
    if (log_z) {
      absl::StrAppend(&line, ", \"log_z_lo\": ", JsonNumber(q.log_z_lo()),
                      ", \"log_z_hi\": ", JsonNumber(q.log_z_hi()));
    }
    absl::StrAppend(&line, ", \"shortfall\": ", JsonString(q.shortfall()),
                    ", \"index_version\": ", r.index_version(), "}");
    std::printf("%s\n", line.c_str());
  }
}

// A Tevatron passage list of ids: docid as a string, title and text empty
// (the texts are joined by docid on the trainer's side).
std::string TevatronPassages(absl::Span<const uint64_t> ids) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    absl::StrAppend(&out, i ? ", " : "", "{\"docid\": \"", ids[i],
                    "\", \"title\": \"\", \"text\": \"\"}");
  }
  return out + "]";
}

// --format tevatron: Tevatron's training JSONL, one object per query
// (query_id the query's row, query empty).
void PrintTevatron(const v1::MineResponse& r, size_t first_query,
                   const std::vector<std::vector<uint64_t>>& positives) {
  for (int qi = 0; qi < r.results_size(); ++qi) {
    const v1::QueryNegatives& q = r.results(qi);
    const size_t row = first_query + qi;
    std::printf("{\"query_id\": \"%zu\", \"query\": \"\", \"positive_passages\": %s, "
                "\"negative_passages\": %s}\n",
                row, TevatronPassages(positives[row]).c_str(),
                TevatronPassages(absl::MakeConstSpan(q.ids().data(), q.ids_size())).c_str());
  }
}

// --format st-ntuple and st-triplet: sentence-transformers' n-tuple
// (anchor, positive, negative_1 .. negative_k) and triplet (anchor,
// positive, negative) rows, as ids: the anchor is the query's row. One row
// per (query, positive) for n-tuples, left out when the query got fewer
// than k negatives (as sentence-transformers does); one per (query,
// positive, negative) for triplets. Returns the rows left out.
size_t PrintSentenceTransformers(const v1::MineResponse& r, size_t first_query, uint32_t k,
                                 bool triplet,
                                 const std::vector<std::vector<uint64_t>>& positives) {
  size_t left_out = 0;
  for (int qi = 0; qi < r.results_size(); ++qi) {
    const v1::QueryNegatives& q = r.results(qi);
    const size_t row = first_query + qi;
    for (const uint64_t positive : positives[row]) {
      const std::string head =
          absl::StrCat("{\"anchor\": ", row, ", \"positive\": ", positive);
      if (triplet) {
        for (const uint64_t negative : q.ids()) {
          std::printf("%s, \"negative\": %" PRIu64 "}\n", head.c_str(), negative);
        }
        continue;
      }
      if (static_cast<uint32_t>(q.ids_size()) < k) {
        ++left_out;
        continue;
      }
      std::string line = head;
      for (int i = 0; i < q.ids_size(); ++i) {
        absl::StrAppend(&line, ", \"negative_", i + 1, "\": ", q.ids(i));
      }
      std::printf("%s}\n", line.c_str());
    }
  }
  return left_out;
}

// An n x m id file (--exclude, --positives) as one list per query, padding
// dropped.
absl::StatusOr<std::vector<std::vector<uint64_t>>> LoadIdLists(const Args& a,
                                                               const std::string& flag,
                                                               size_t num_queries) {
  std::vector<std::vector<uint64_t>> lists;
  if (!a.Has(flag)) return lists;
  const std::string what = absl::StrCat("--", flag);
  CLI_ASSIGN(e, LoadNpyIds(a.Get(flag), NegativeIds::kPadding, what));
  if (e.rows != num_queries) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", e.rows, " rows for ", num_queries, " queries"));
  }
  lists.resize(e.rows);
  for (size_t i = 0; i < e.rows; ++i) {
    for (size_t j = 0; j < e.cols; ++j) {
      const uint64_t id = e.data[i * e.cols + j];
      if (id != kPaddingId) lists[i].push_back(id);
    }
  }
  return lists;
}

// The optional float `flag` into the MineFilters field `set` (unset when
// the flag is absent: the filter stays off).
absl::Status OptionalFloat(const Args& a, const std::string& flag,
                           const std::function<void(float)>& set) {
  if (!a.Has(flag)) return absl::OkStatus();
  CLI_ASSIGN(v, a.Number<float>(flag, 0));
  set(v);
  return absl::OkStatus();
}

// Queries per MineRequest: at most the server's max_batch, and few enough
// that the request (float32 rows and their exclusion lists) and the
// response (per result a varint id, a float score and a float log q; per
// query num_top, log Z, num_eligible and framing) stay within the smaller
// of the server's and this client's message limits, with a quarter spare.
size_t QueriesPerRequest(const v1::ServerLimits& limits, size_t dim, size_t k,
                         size_t max_exclude, size_t client_receive_bytes) {
  uint64_t max_message = limits.max_message_bytes() > 0 ? limits.max_message_bytes() : 4 << 20;
  max_message = std::min<uint64_t>(max_message, client_receive_bytes);
  const uint64_t budget = max_message / 4 * 3 > 4096 ? max_message / 4 * 3 - 4096 : 1;
  const uint64_t request_row = dim * 4 + max_exclude * 10 + 16;
  const uint64_t response_row = k * 18 + 64;
  uint64_t rows = budget / std::max(request_row, response_row);
  if (limits.max_batch() > 0) rows = std::min<uint64_t>(rows, limits.max_batch());
  return static_cast<size_t>(std::max<uint64_t>(rows, 1));
}

// Mines q.rows queries over one MineStream in requests of at most
// `per_request` queries, two in flight (the server works on the next while
// this side reads the last), and hands each response to `consume` with its
// first query, in query order.
absl::Status MineInRequests(
    Client& c, const std::string& collection, const Array<float>& q, const v1::MineParams& p,
    const std::vector<std::vector<uint64_t>>& exclude,
    const std::vector<std::vector<uint64_t>>& positives, size_t per_request, bool to_file,
    const std::function<void(const v1::MineResponse&, size_t)>& consume) {
  const size_t n = q.rows;
  // Progress, unless the results themselves go to the terminal.
  std::optional<Progress> progress;
  if (to_file || isatty(STDOUT_FILENO) != 1) {
    progress.emplace(absl::StrCat("mine '", collection, "'"), n, "queries");
  }
  std::unique_ptr<MineSession> session = c.OpenMineSession(collection);
  std::deque<size_t> in_flight;  // first query of each request sent
  size_t sent = 0, done = 0;
  const absl::Span<const float> queries(q.data);
  const absl::Span<const std::vector<uint64_t>> excl(exclude);
  const absl::Span<const std::vector<uint64_t>> pos(positives);
  while (done < n) {
    while (in_flight.size() < 2 && sent < n) {
      const size_t m = std::min(per_request, n - sent);
      auto id = session->Send(queries.subspan(sent * q.cols, m * q.cols),
                              static_cast<uint32_t>(q.cols), p,
                              excl.empty() ? excl : excl.subspan(sent, m),
                              pos.empty() ? pos : pos.subspan(sent, m));
      if (!id.ok()) {  // the stream broke: Close() says why
        absl::Status closed = session->Close();
        return closed.ok() ? id.status() : closed;
      }
      in_flight.push_back(sent);
      sent += m;
    }
    const size_t begin = in_flight.front();
    in_flight.pop_front();
    const size_t m = std::min(per_request, n - begin);
    absl::StatusOr<v1::MineResponse> r = session->Receive();
    if (!r.ok()) {
      session->Close().IgnoreError();
      return absl::Status(r.status().code(),
                          absl::StrCat("queries ", begin, "..", begin + m - 1, " of ", n, ": ",
                                       r.status().message()));
    }
    consume(*r, begin);
    done += m;
    if (progress) progress->Set(done);
  }
  if (progress) progress->Finish();
  CLI_CHECK(session->Close());
  return absl::OkStatus();
}

}  // namespace

absl::Status Mine(Client& c, const Args& a) {
  CLI_ASSIGN(collection, a.Required("collection"));
  CLI_ASSIGN(info, c.GetIndexInfo(collection));
  const uint32_t dim = info.info().config().dim();
  Array<float> q;
  if (a.Has("queries")) {
    CLI_ASSIGN(loaded, LoadNpyFloat(a.Get("queries")));
    q = std::move(loaded);
  } else if (a.Has("random-queries")) {
    CLI_ASSIGN(n, a.Number<uint64_t>("random-queries", 0));
    CLI_ASSIGN(seed, a.Number<uint64_t>("seed", 1));
    DriftBench bench({.num_targets = 0, .num_queries = n,
                      .dim = static_cast<int>(dim), .seed = seed});
    q = {n, dim, bench.Queries(0)};
  } else {
    return absl::InvalidArgumentError("give --queries Q.npy or --random-queries N");
  }
  v1::MineParams p;
  CLI_ASSIGN(k, a.Number<uint32_t>("k", 10));
  p.set_k(k);
  const std::string mode = a.Get("mode", "topk");
  if (mode == "topk") p.set_mode(v1::MINE_MODE_TOP_K);
  else if (mode == "sample") p.set_mode(v1::MINE_MODE_SAMPLE);
  else if (mode == "mixed") p.set_mode(v1::MINE_MODE_MIXED);
  else return absl::InvalidArgumentError(absl::StrCat("--mode = '", mode, "': use topk, sample or mixed"));
  // The proto requires a temperature for SAMPLE and MIXED: no silent default.
  if (p.mode() != v1::MINE_MODE_TOP_K && !a.Has("temperature")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--temperature T is required with --mode ", mode, " (the softmax is over s / T)"));
  }
  CLI_ASSIGN(tau, a.Number<float>("temperature", 0));
  p.set_temperature(tau);
  CLI_ASSIGN(num_hard, a.Number<uint32_t>("num-hard", k / 2));
  p.set_num_hard(num_hard);
  CLI_ASSIGN(rank_offset, a.Number<uint32_t>("rank-offset", 0));
  p.set_rank_offset(rank_offset);
  p.set_with_replacement(a.Has("with-replacement"));
  CLI_ASSIGN(sample_seed, a.Number<uint64_t>("sample-seed", 0));
  p.set_seed(sample_seed);
  // A certified log Z costs far more than the draws themselves: only on request.
  const bool log_z = a.Has("log-z");
  p.set_return_log_z(log_z);
  CLI_ASSIGN(log_z_width, a.Number<double>("log-z-width", 0));
  if (log_z_width < 0 || (log_z_width > 0 && !log_z)) {
    return absl::InvalidArgumentError("--log-z-width W needs --log-z and W > 0");
  }
  p.set_log_z_width(log_z_width);
  const std::string sampler = a.Get("sampler", "proposal");
  if (sampler == "proposal") p.set_sampler(v1::SAMPLER_PROPOSAL);
  else if (sampler == "exact") p.set_sampler(v1::SAMPLER_EXACT);
  else return absl::InvalidArgumentError(absl::StrCat("--sampler = '", sampler, "': use proposal or exact"));
  p.set_approximate(a.Has("approximate"));
  CLI_ASSIGN(beam, a.Number<uint32_t>("beam-width", 0));
  p.set_beam_width(beam);
  v1::MineFilters* f = p.mutable_filters();
  CLI_CHECK(OptionalFloat(a, "min-score", [f](float v) { f->set_min_score(v); }));
  CLI_CHECK(OptionalFloat(a, "max-score", [f](float v) { f->set_max_score(v); }));
  CLI_CHECK(OptionalFloat(a, "absolute-margin", [f](float v) { f->set_absolute_margin(v); }));
  CLI_CHECK(OptionalFloat(a, "relative-margin", [f](float v) { f->set_relative_margin(v); }));
  CLI_CHECK(OptionalFloat(a, "dedupe-cosine", [f](float v) { f->set_dedupe_cosine(v); }));
  const std::string distribution = a.Get("distribution", "softmax");
  if (distribution == "softmax") {
    p.set_distribution(v1::SAMPLE_DISTRIBUTION_SOFTMAX);
  } else if (distribution == "simans") {
    p.set_distribution(v1::SAMPLE_DISTRIBUTION_SIMANS);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--distribution = '", distribution, "': use softmax or simans"));
  }
  v1::SimansParams* simans = p.mutable_simans();
  CLI_CHECK(OptionalFloat(a, "simans-a", [simans](float v) { simans->set_a(v); }));
  CLI_CHECK(OptionalFloat(a, "simans-b", [simans](float v) { simans->set_b(v); }));
  CLI_ASSIGN(simans_candidates, a.Number<uint32_t>("simans-candidates", 0));
  simans->set_candidates(simans_candidates);
  CLI_ASSIGN(exclude, LoadIdLists(a, "exclude", q.rows));
  CLI_ASSIGN(positives, LoadIdLists(a, "positives", q.rows));
  // --json is the old spelling of --format json.
  if (a.Has("json") && a.Has("format") && a.Get("format") != "json") {
    return absl::InvalidArgumentError("--json is --format json; give one of them");
  }
  const std::string format_name = a.Get("format", a.Has("json") ? "json" : "table");
  Format format;
  if (format_name == "table") format = Format::kTable;
  else if (format_name == "json") format = Format::kJson;
  else if (format_name == "jsonl") format = Format::kJsonl;
  else if (format_name == "tevatron") format = Format::kTevatron;
  else if (format_name == "st-ntuple") format = Format::kStNtuple;
  else if (format_name == "st-triplet") format = Format::kStTriplet;
  else {
    return absl::InvalidArgumentError(absl::StrCat(
        "--format = '", format_name,
        "': use table, json, jsonl, tevatron, st-ntuple or st-triplet"));
  }
  if ((format == Format::kTevatron || format == Format::kStNtuple ||
       format == Format::kStTriplet) && positives.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--format ", format_name, " needs --positives P.npy (its rows pair each query with "
        "its positives)"));
  }
  const std::string out = a.Get("out");
  CLI_ASSIGN(batch_flag, a.Number<uint32_t>("queries-per-request", 0));
  CLI_CHECK(a.CheckAllUsed());
  const size_t n = q.rows;
  if (n == 0) return absl::InvalidArgumentError("the query file holds no queries");
  // Exclusion and positive ids cost the same in a request.
  size_t max_exclude = 0;
  for (size_t i = 0; i < n; ++i) {
    max_exclude = std::max(max_exclude, (exclude.empty() ? 0 : exclude[i].size()) +
                                            (positives.empty() ? 0 : positives[i].size()));
  }
  const size_t per_request =
      batch_flag > 0 ? batch_flag
                     : QueriesPerRequest(info.limits(), q.cols, k, max_exclude,
                                         c.options().max_receive_message_bytes);
  // Results in query order, whatever the number of requests.
  std::vector<uint64_t> ids;
  std::vector<float> scores, log_q;
  std::vector<double> log_z_bounds;
  if (!out.empty()) {
    ids.assign(n * k, kPaddingId);
    scores.assign(n * k, NAN);
    log_q.assign(n * k, NAN);
    log_z_bounds.assign(n * 2, NAN);
  }
  uint64_t first_version = 0, last_version = 0;
  size_t left_out = 0;  // st-ntuple rows of queries with fewer than k negatives
  auto consume = [&](const v1::MineResponse& r, size_t begin) {
    if (begin == 0) first_version = r.index_version();
    last_version = r.index_version();
    if (!out.empty()) {
      for (int i = 0; i < r.results_size(); ++i) {
        const v1::QueryNegatives& res = r.results(i);
        const size_t row = begin + i;
        for (int j = 0; j < res.ids_size() && j < static_cast<int>(k); ++j) {
          ids[row * k + j] = res.ids(j);
          scores[row * k + j] = res.scores(j);
          log_q[row * k + j] = res.log_q(j);
        }
        log_z_bounds[2 * row] = res.log_z_lo();
        log_z_bounds[2 * row + 1] = res.log_z_hi();
      }
    }
    switch (format) {
      case Format::kTable:
        if (out.empty()) PrintTable(r, begin, log_z);
        break;
      case Format::kJson:
        PrintJson(r, begin, log_z);
        break;
      case Format::kJsonl:
        PrintJsonl(r, begin, log_z, positives);
        break;
      case Format::kTevatron:
        PrintTevatron(r, begin, positives);
        break;
      case Format::kStNtuple:
      case Format::kStTriplet:
        left_out += PrintSentenceTransformers(r, begin, k, format == Format::kStTriplet,
                                              positives);
        break;
    }
  };
  if (n <= per_request) {
    // One request: one Mine call.
    CLI_ASSIGN(r, c.Mine(collection, q.data, static_cast<uint32_t>(q.cols), p, exclude,
                         positives));
    consume(r, 0);
  } else {
    CLI_CHECK(MineInRequests(c, collection, q, p, exclude, positives, per_request,
                             !out.empty() || format != Format::kTable, consume));
  }
  if (left_out > 0) {
    std::fprintf(stderr,
                 "st-ntuple: left out %zu (query, positive) rows whose query got fewer than "
                 "%u negatives\n", left_out, k);
  }
  if (!out.empty()) {
    std::string stem = out;
    if (stem.size() > 4 && stem.substr(stem.size() - 4) == ".npy") stem.resize(stem.size() - 4);
    CLI_CHECK(SaveNpy(stem + ".npy", n, k, ids));
    CLI_CHECK(SaveNpy(stem + ".scores.npy", n, k, scores));
    CLI_CHECK(SaveNpy(stem + ".log_q.npy", n, k, log_q));
    if (log_z) CLI_CHECK(SaveNpy(stem + ".log_z.npy", n, 2, log_z_bounds));
    std::fprintf(stderr, "wrote %s.npy, %s.scores.npy, %s.log_q.npy%s\n", stem.c_str(),
                 stem.c_str(), stem.c_str(),
                 log_z ? absl::StrCat(", ", stem, ".log_z.npy").c_str() : "");
  }
  if (format == Format::kTable && out.empty()) {
    if (first_version == last_version) {
      std::printf("\nindex version %" PRIu64 "\n", last_version);
    } else {
      std::printf("\nindex versions %" PRIu64 "..%" PRIu64 " (writes landed between requests)\n",
                  first_version, last_version);
    }
  }
  return absl::OkStatus();
}

}  // namespace negmine::client::cli
