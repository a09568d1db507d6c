// negmine-bench: the drift bench (DESIGN.md section 4). In one process, on the
// same data, it measures negmine against brute force, FAISS (Flat, IVF-Flat,
// HNSW) and hnswlib:
//   - recall@k against queries/s over each index's knob, build time and
//     memory per target;
//   - the cost of absorbing re-encoded embeddings for a fraction of targets,
//     and the recall after it;
//   - sampling quality (chi-square and TV against the exact softmax over
//     equal-mass bins; the relative error of the grad log Z estimate against
//     brute-force top-k) and sampling throughput;
//   - under drift, recall@k and the softmax's KL against the step for a
//     static index, a static index rebuilt every R steps, and negmine's
//     drift-corrected tree at several m (plus one variant that also
//     re-encodes a budget of targets per step), with the cost of an update;
//   - with --server_bin, the same top-k through the gRPC server (C++ client,
//     MineStream), against the in-process figure.
// It writes results.json and results.md to --out_dir.
//
// The data are the drift-bench generator's (--preset easy or hard), or the
// caller's own embeddings (--targets and --queries as .npy or .fvecs files),
// with the truth computed by brute force in the run. On files the drift
// figures, which need the generator's drifting encoder, are skipped.
//
//   negmine-bench --n=1000000 --dim=128 --queries=4096 --k=64 --threads=2
//       --out_dir=bench/results --server_bin=build/server/negmine-server
//   negmine-bench --targets=emb.npy --queries=queries.fvecs --k=64
#include <sys/resource.h>

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <Eigen/Core>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/peers.h"
#include "client/negmine_client.h"
#include "client/npy.h"
#include "core/batches/gcbs.h"
#include "core/index.h"
#include "core/random.h"
#include "core/store/drift_bench.h"
#include "core/tree/tree_index.h"
#include "tests/server_process.h"

ABSL_FLAG(uint64_t, n, 1000000, "targets (the generator; ignored with --targets)");
ABSL_FLAG(int, dim, 128, "embedding dimension (the generator; ignored with --targets)");
ABSL_FLAG(std::string, queries, "4096",
          "queries per batch: a count for the generator, or with --targets a .npy "
          "(float32/float16) or .fvecs file of queries, one per row");
ABSL_FLAG(std::string, targets, "",
          "a .npy (float32/float16, rows x dim) or .fvecs file of target embeddings "
          "instead of the generator; needs --queries=FILE of the same dim");
ABSL_FLAG(bool, normalize, false, "L2-normalize the rows of --targets and --queries files");
ABSL_FLAG(std::string, preset, "easy",
          "the generator's mixture: easy (well-separated clusters) or hard (overlapping "
          "clusters; FAISS IVF-Flat with 4 sqrt(N) lists needs nprobe >= 256 for "
          "recall@64 0.94 at 1M x 128)");
ABSL_FLAG(int, latent_dim, 0, "override the preset's latent dimension (0: the preset's)");
ABSL_FLAG(int, num_clusters, 0, "override the preset's number of clusters (0: the preset's)");
ABSL_FLAG(double, cluster_spread, 0,
          "override the preset's within-cluster std per latent axis (0: the preset's)");
ABSL_FLAG(std::string, export_dir, "",
          "write the generator's step-0 targets and queries to this directory as "
          "targets.npy, queries.npy (float32), targets_f16.npy, queries_f16.npy (float16) "
          "and targets.fvecs, queries.fvecs, then exit");
ABSL_FLAG(int, k, 64, "negatives per query");
ABSL_FLAG(int, threads, 2, "threads for every index");
ABSL_FLAG(uint64_t, seed, 1, "drift-bench seed");
ABSL_FLAG(std::string, peers,
          "negmine-exact,negmine-tree-exact,negmine-tree,faiss-flat,faiss-ivfflat,faiss-hnsw,hnswlib",
          "indexes to measure, comma-separated");
ABSL_FLAG(int, ivf_nlist, 1024,
          "FAISS IVF lists (0: 4 sqrt(N)); nprobe is swept over powers of two up to it");
ABSL_FLAG(int, hnsw_m, 16, "HNSW M (FAISS and hnswlib)");
ABSL_FLAG(int, hnsw_ef_construction, 40, "HNSW efConstruction (FAISS and hnswlib; 40 is FAISS's default)");
ABSL_FLAG(double, update_fraction, 0.01, "fraction of targets re-encoded for the update test");
ABSL_FLAG(int, drift_steps, 20, "last drift step");
ABSL_FLAG(int, drift_every, 4, "evaluate recall every this many steps");
ABSL_FLAG(int, rebuild_every, 10, "the static peer is rebuilt every R steps");
ABSL_FLAG(double, reencode_budget, 0.005,
          "fraction of targets one drift variant also re-encodes per step (0: none)");
ABSL_FLAG(std::string, drift_landmarks, "2,8", "landmarks per drift variant, in multiples of dim");
ABSL_FLAG(uint64_t, kl_queries, 32, "queries for the KL-under-drift figure");
ABSL_FLAG(double, kl_temperature, 0.05, "softmax temperature of the KL-under-drift figure");
ABSL_FLAG(uint64_t, drift_queries, 1024, "queries per drift evaluation");
ABSL_FLAG(uint64_t, sample_queries, 32, "queries for the sampling-quality figures");
ABSL_FLAG(int, sample_rounds, 40, "draw rounds of k samples per query (chi-square / TV)");
ABSL_FLAG(std::string, sections, "curves,sampling,drift,batches,e2e",
          "which parts to run, comma-separated");
ABSL_FLAG(uint64_t, batches_n, 0, "GCBS examples (0: --n)");
ABSL_FLAG(int, batch_size, 128, "GCBS batch size");
ABSL_FLAG(uint64_t, batches_dense_n, 20000, "GCBS subsample for the dense O(N^2) reference");
ABSL_FLAG(std::string, server_bin, "", "negmine-server binary for the end-to-end figure");
ABSL_FLAG(int, e2e_batches, 2, "MineStream batches per stream in the end-to-end figure");
ABSL_FLAG(std::string, out_dir, "bench/results", "where results.json and results.md go");
ABSL_FLAG(std::string, flags_note, "", "build flags to record next to the figures");

namespace negmine::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

size_t RssBytes() {
  std::ifstream in("/proc/self/statm");
  size_t pages = 0, resident = 0;
  in >> pages >> resident;
  return resident * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

void Log(const std::string& s) {
  std::fprintf(stderr, "[bench] %s\n", s.c_str());
}

bool Enabled(absl::string_view section) {
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_sections), ',')) {
    if (s == section) return true;
  }
  return false;
}

[[noreturn]] void Die(const std::string& s) {
  std::fprintf(stderr, "[bench] fatal: %s\n", s.c_str());
  std::exit(1);
}

// A tiny JSON writer: enough for flat records and arrays of them.
class Json {
 public:
  Json& Num(const std::string& k, double v) {
    Key(k);
    if (std::isfinite(v)) {
      out_ << v;
    } else {
      out_ << "null";
    }
    return *this;
  }
  Json& Str(const std::string& k, const std::string& v) {
    Key(k);
    out_ << '"' << v << '"';
    return *this;
  }
  Json& Raw(const std::string& k, const std::string& v) {
    Key(k);
    out_ << v;
    return *this;
  }
  std::string Done() { return "{" + out_.str() + "}"; }

 private:
  void Key(const std::string& k) {
    if (!first_) out_ << ", ";
    first_ = false;
    out_ << '"' << k << "\": ";
  }
  std::ostringstream out_;
  bool first_ = true;
};

std::string JsonArray(const std::vector<std::string>& items) {
  return "[\n    " + absl::StrJoin(items, ",\n    ") + "\n  ]";
}

// recall@k of `got` (nq x k) against `truth` (nq x k).
double Recall(const std::vector<int64_t>& got, const std::vector<int64_t>& truth,
              size_t nq, int k) {
  size_t hits = 0;
  for (size_t i = 0; i < nq; ++i) {
    std::set<int64_t> t(truth.begin() + i * k, truth.begin() + (i + 1) * k);
    for (int j = 0; j < k; ++j) hits += t.count(got[i * k + j]);
  }
  return static_cast<double>(hits) / (nq * k);
}

std::unique_ptr<BenchIndex> Make(const std::string& name, const PeerOptions& o) {
  if (name == "negmine-exact") return MakeNegmineExact(o.threads);
  if (name == "negmine-tree") return MakeNegmineTree(o.threads, /*exact=*/false);
  if (name == "negmine-tree-exact") return MakeNegmineTree(o.threads, /*exact=*/true);
  if (name == "faiss-flat") return MakeFaissFlat(o);
  if (name == "faiss-ivfflat") return MakeFaissIvfFlat(o);
  if (name == "faiss-hnsw") return MakeFaissHnsw(o);
  if (name == "hnswlib") return MakeHnswlib(o);
  std::fprintf(stderr, "unknown index '%s'\n", name.c_str());
  std::exit(2);
}

struct Curve {
  std::string index, knob_name;
  double build_s = 0, mem_bytes = 0, rss_bytes = 0;
  std::vector<int> knobs;
  std::vector<double> recall, qps;
  int knob95 = -1;  // the first knob reaching recall 0.95 (-1: none)
  double update_s = NAN, update_recall_before = NAN, update_recall_after = NAN;
  bool update_in_place = true;
};

// Exact top-k over x (n x dim) for q, by negmine's exact index.
std::vector<int64_t> Truth(const float* x, size_t n, int dim, const float* q,
                           size_t nq, int k, int threads) {
  auto exact = MakeNegmineExact(threads);
  exact->Build(x, n, dim);
  return exact->Search(q, nq, k, 0);
}

// ------------------------------------------------------------ data

// A row-major float matrix read from a file.
struct Matrix {
  size_t rows = 0;
  int cols = 0;
  std::vector<float> data;
};

// Loads `path` (.npy float32/float16/float64, or .fvecs) for `flag`; exits
// with a message naming the flag and the file on any problem.
Matrix LoadEmbeddings(const std::string& flag, const std::string& path, bool normalize) {
  absl::StatusOr<client::Array<float>> a;
  if (absl::EndsWith(path, ".npy")) {
    a = client::LoadNpyFloat(path);
  } else if (absl::EndsWith(path, ".fvecs")) {
    a = client::LoadFvecs(path);
  } else {
    Die(absl::StrCat("--", flag, "=", path, ": want a .npy or .fvecs file"));
  }
  if (!a.ok()) Die(absl::StrCat("--", flag, "=", path, ": ", a.status().message()));
  if (a->rows == 0 || a->cols == 0) {
    Die(absl::StrCat("--", flag, "=", path, ": empty (", a->rows, " x ", a->cols, ")"));
  }
  if (a->cols > (1u << 20)) {
    Die(absl::StrCat("--", flag, "=", path, ": ", a->cols, " columns is not a dim"));
  }
  Matrix m{.rows = a->rows, .cols = static_cast<int>(a->cols), .data = std::move(a->data)};
  for (size_t i = 0; i < m.rows; ++i) {
    float* row = &m.data[i * m.cols];
    double norm2 = 0;
    for (int j = 0; j < m.cols; ++j) {
      if (!std::isfinite(row[j])) {
        Die(absl::StrCat("--", flag, "=", path, ": row ", i, " column ", j,
                         " is not finite (", row[j], ")"));
      }
      norm2 += double{row[j]} * row[j];
    }
    if (normalize) {
      if (norm2 == 0) Die(absl::StrCat("--", flag, "=", path, ": row ", i, " is zero; cannot normalize"));
      const float inv = static_cast<float>(1 / std::sqrt(norm2));
      for (int j = 0; j < m.cols; ++j) row[j] *= inv;
    }
  }
  return m;
}

void WriteOrDie(const std::string& path, const absl::Status& status) {
  if (!status.ok()) Die(absl::StrCat(path, ": ", status.message()));
  Log("wrote " + path);
}

// .fvecs: per row, int32 dim then dim float32.
absl::Status SaveFvecs(const std::string& path, size_t rows, int cols,
                       const std::vector<float>& x) {
  std::ofstream out(path, std::ios::binary);
  if (!out) return absl::PermissionDeniedError("cannot open for writing");
  for (size_t i = 0; i < rows; ++i) {
    const int32_t d = cols;
    out.write(reinterpret_cast<const char*>(&d), sizeof(d));
    out.write(reinterpret_cast<const char*>(&x[i * cols]), sizeof(float) * cols);
  }
  out.close();
  return out ? absl::OkStatus() : absl::DataLossError("write failed");
}

// A version-1 .npy of dtype <f2 (IEEE half, rounded to nearest).
absl::Status SaveNpyHalf(const std::string& path, size_t rows, int cols,
                         const std::vector<float>& x) {
  std::string header = absl::StrCat("{'descr': '<f2', 'fortran_order': False, 'shape': (",
                                     rows, ", ", cols, "), }");
  // Magic (6) + version (2) + length (2) + header + '\n', padded to 64.
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) return absl::PermissionDeniedError("cannot open for writing");
  const uint16_t len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.put(static_cast<char>(len & 0xff));
  out.put(static_cast<char>(len >> 8));
  out << header;
  for (float v : x) {
    const uint16_t bits = Eigen::numext::bit_cast<uint16_t>(Eigen::half(v));
    out.put(static_cast<char>(bits & 0xff));
    out.put(static_cast<char>(bits >> 8));
  }
  out.close();
  return out ? absl::OkStatus() : absl::DataLossError("write failed");
}

// ------------------------------------------------------------ sampling

struct SamplingFigures {
  std::string sampler;
  double tau = 0;
  double topk_grad_error = 0, sample_grad_error = 0;
  double chi2 = 0, chi2_critical = 0, tv = 0;
  int chi2_df = 0;
  double sample_qps = 0;
};

// Equal-mass binning of the exact softmax, for chi-square and TV on N-sized
// supports: bin b holds the targets whose cumulative mass (in descending
// probability order) falls in [b/B, (b+1)/B).
// Throughput is measured separately on the first `throughput_queries`.
SamplingFigures MeasureSampling(const std::string& label, const Index& index,
                                Sampler sampler, const std::vector<float>& x,
                                size_t n, int dim, const std::vector<float>& q,
                                size_t nq, size_t throughput_queries, int k,
                                double tau, int rounds, int threads) {
  constexpr int kBins = 10;
  SamplingFigures f;
  f.sampler = label;
  f.tau = tau;
  std::vector<int64_t> counts(kBins, 0);
  double topk_err = 0, sample_err = 0;
  for (size_t qi = 0; qi < nq; ++qi) {
    const float* qv = &q[qi * dim];
    std::vector<double> s(n);
    for (size_t y = 0; y < n; ++y) {
      double v = 0;
      for (int j = 0; j < dim; ++j) v += double{qv[j]} * x[y * dim + j];
      s[y] = v;
    }
    const double m = *std::max_element(s.begin(), s.end());
    std::vector<double> p(n);
    double z = 0;
    for (size_t y = 0; y < n; ++y) z += p[y] = std::exp((s[y] - m) / tau);
    for (double& v : p) v /= z;
    // The exact gradient direction E_p[x] (the 1/tau factor cancels in the
    // relative error).
    std::vector<double> g(dim, 0.0);
    for (size_t y = 0; y < n; ++y) {
      for (int j = 0; j < dim; ++j) g[j] += p[y] * x[y * dim + j];
    }
    double gnorm = 0;
    for (double v : g) gnorm += v * v;
    gnorm = std::sqrt(gnorm);
    auto rel_err = [&](const std::vector<uint64_t>& ids,
                       const std::vector<double>& w) {
      std::vector<double> e(dim, 0.0);
      double wsum = 0;
      for (size_t i = 0; i < ids.size(); ++i) {
        wsum += w[i];
        for (int j = 0; j < dim; ++j) e[j] += w[i] * x[ids[i] * dim + j];
      }
      double err = 0;
      for (int j = 0; j < dim; ++j) err += std::pow(e[j] / wsum - g[j], 2);
      return std::sqrt(err) / gnorm;
    };
    const absl::Span<const float> qspan(qv, dim);
    auto top = index.Search(qspan, {}, {.mode = MineMode::kTopK, .k = k});
    std::vector<double> wt;
    for (float sc : top->queries[0].scores) wt.push_back(std::exp((sc - m) / tau));
    topk_err += rel_err(top->queries[0].ids, wt);

    // Bins by descending probability.
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
    std::vector<int> bin(n);
    double cum = 0;
    for (size_t r = 0; r < n; ++r) {
      bin[order[r]] = std::min(kBins - 1, static_cast<int>(cum * kBins));
      cum += p[order[r]];
    }
    std::vector<double> bin_mass(kBins, 0.0);
    for (size_t y = 0; y < n; ++y) bin_mass[bin[y]] += p[y];

    // `rounds` copies of the query in one call: copy i draws from the
    // stream (seed, i), so the rounds are independent.
    std::vector<float> copies;
    for (int r = 0; r < rounds; ++r) copies.insert(copies.end(), qv, qv + dim);
    SearchParams sp{.mode = MineMode::kSample, .sampler = sampler, .k = k,
                    .temperature = static_cast<float>(tau),
                    .with_replacement = true, .seed = 1000003 * (qi + 1)};
    auto smp = index.Search(copies, {}, sp);
    if (!smp.ok()) std::abort();
    std::vector<int64_t> qcounts(kBins, 0);
    for (int r = 0; r < rounds; ++r) {
      const QueryResult& res = smp->queries[r];
      if (r == 0) {
        // Self-normalized weights exp(s/tau) / q(y).
        std::vector<double> w;
        for (size_t i = 0; i < res.ids.size(); ++i) {
          w.push_back(std::exp((res.scores[i] - m) / tau - res.log_q[i]));
        }
        sample_err += rel_err(res.ids, w);
      }
      for (uint64_t id : res.ids) ++qcounts[bin[id]];
    }
    const double draws = static_cast<double>(rounds) * k;
    for (int b = 0; b < kBins; ++b) {
      const double e = bin_mass[b] * draws;
      if (e > 0) f.chi2 += (qcounts[b] - e) * (qcounts[b] - e) / e;
      f.tv += 0.5 * std::abs(qcounts[b] / draws - bin_mass[b]) / nq;
      counts[b] += qcounts[b];
    }
  }
  f.chi2_df = static_cast<int>(nq) * (kBins - 1);
  const double h = 2.0 / (9.0 * f.chi2_df);
  f.chi2_critical = f.chi2_df * std::pow(1 - h + 3.09 * std::sqrt(h), 3);
  f.topk_grad_error = topk_err / nq;
  f.sample_grad_error = sample_err / nq;

  // Throughput of SAMPLE mode, `threads` threads.
  const auto start = Clock::now();
  ParallelFor(throughput_queries, threads, [&](size_t b, size_t e) {
    SearchParams sp{.mode = MineMode::kSample, .sampler = sampler, .k = k,
                    .temperature = static_cast<float>(tau), .seed = 7};
    auto r = index.Search({&q[b * dim], (e - b) * dim}, {}, sp);
    if (!r.ok()) std::abort();
  });
  f.sample_qps = throughput_queries / Seconds(start);
  return f;
}

// ----------------------------------------------------------- end to end

struct E2eFigures {
  double upsert_rows_per_s = 0, stream_qps = 0, inprocess_qps = 0;
  double recall = 0;
};

E2eFigures MeasureEndToEnd(const std::string& server_bin,
                           const std::vector<float>& x, size_t n, int dim,
                           const std::vector<float>& q, size_t nq, int k,
                           int threads, int batches,
                           const std::vector<int64_t>& truth,
                           double inprocess_qps) {
  E2eFigures f;
  f.inprocess_qps = inprocess_qps;
  testing::ServerProcess server;
  if (!server.Start(server_bin, {absl::StrCat("--worker_threads=", threads),
                                 "--max_message_bytes=268435456"})) {
    Log("end to end: the server did not start; skipped");
    return f;
  }
  client::ClientOptions options;
  auto c = client::Client::Connect(server.address(), options);
  v1::CollectionConfig config;
  config.set_name("bench");
  config.set_dim(dim);
  config.set_metric(v1::METRIC_INNER_PRODUCT);
  config.set_index_kind(v1::INDEX_KIND_TREE);  // exact top-k on the tree
  if (!c->CreateCollection(config).ok()) std::abort();
  std::vector<uint64_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  auto start = Clock::now();
  auto up = c->Upsert("bench", ids, x, dim, 0);
  if (!up.ok()) {
    Log("end to end: upsert failed: " + up.status().ToString());
    return f;
  }
  f.upsert_rows_per_s = n / Seconds(start);

  v1::MineParams p;
  p.set_k(k);
  // One MineStream per thread, each pipelining `batches` full batches.
  std::vector<double> recalls(threads, 0);
  start = Clock::now();
  ParallelFor(threads, threads, [&](size_t b, size_t) {
    auto session = c->OpenMineSession("bench");
    int sent = 0, received = 0;
    while (received < batches) {
      while (sent < batches && sent - received < 2) {
        if (!session->Send(q, dim, p).ok()) std::abort();
        ++sent;
      }
      auto r = session->Receive();
      if (!r.ok()) {
        Log("end to end: " + r.status().ToString());
        std::abort();
      }
      if (received == 0) {
        std::vector<int64_t> got(nq * k, -1);
        for (size_t i = 0; i < nq; ++i) {
          for (int j = 0; j < r->results(i).ids_size(); ++j) got[i * k + j] = r->results(i).ids(j);
        }
        recalls[b] = Recall(got, truth, nq, k);
      }
      ++received;
    }
    if (!session->Close().ok()) std::abort();
  });
  f.stream_qps = static_cast<double>(threads) * batches * nq / Seconds(start);
  f.recall = std::accumulate(recalls.begin(), recalls.end(), 0.0) / threads;
  server.Stop();
  return f;
}

int Main() {
  const int k = absl::GetFlag(FLAGS_k);
  const int threads = absl::GetFlag(FLAGS_threads);
  const uint64_t seed = absl::GetFlag(FLAGS_seed);
  if (k <= 0) Die(absl::StrCat("--k=", k, ": want k >= 1"));
  if (threads <= 0) Die(absl::StrCat("--threads=", threads, ": want >= 1"));
  omp_set_num_threads(threads);
  const auto bench_start = Clock::now();

  // The data: the caller's files, or the generator.
  const std::string targets_path = absl::GetFlag(FLAGS_targets);
  const std::string queries_flag = absl::GetFlag(FLAGS_queries);
  uint64_t queries_count = 0;
  const bool queries_is_count = absl::SimpleAtoi(queries_flag, &queries_count);
  const bool from_files = !targets_path.empty();
  if (from_files && queries_is_count) {
    Die("--targets needs --queries=FILE (.npy or .fvecs) too: queries from the same encoder");
  }
  if (!from_files && !queries_is_count) {
    Die(absl::StrCat("--queries=", queries_flag,
                     " is a file: give the targets with --targets=FILE too (or a count of "
                     "generated queries)"));
  }
  size_t n = 0, nq = 0;
  int dim = 0;
  std::vector<float> x0, q_all;
  std::unique_ptr<DriftBench> gen;
  std::string data_note;
  if (from_files) {
    if (!absl::GetFlag(FLAGS_export_dir).empty()) Die("--export_dir writes the generator's data; drop --targets");
    Matrix t = LoadEmbeddings("targets", targets_path, absl::GetFlag(FLAGS_normalize));
    Matrix q = LoadEmbeddings("queries", queries_flag, absl::GetFlag(FLAGS_normalize));
    if (t.cols != q.cols) {
      Die(absl::StrCat("dim mismatch: --targets=", targets_path, " has dim ", t.cols, ", --queries=",
                       queries_flag, " has dim ", q.cols));
    }
    if (t.rows < static_cast<size_t>(k)) {
      Die(absl::StrCat("--targets=", targets_path, ": ", t.rows, " rows, too few for k = ", k,
                       " (want at least k rows)"));
    }
    n = t.rows;
    dim = t.cols;
    nq = q.rows;
    x0 = std::move(t.data);
    q_all = std::move(q.data);
    data_note = absl::StrCat("files --targets=", targets_path, " --queries=", queries_flag,
                             absl::GetFlag(FLAGS_normalize) ? " (rows L2-normalized)" : "");
    Log(absl::StrCat("data: ", data_note, "; --n, --dim and the generator's flags are not used"));
  } else {
    n = absl::GetFlag(FLAGS_n);
    dim = absl::GetFlag(FLAGS_dim);
    nq = queries_count;
    if (n < static_cast<size_t>(k)) Die(absl::StrCat("--n=", n, ": too few targets for k = ", k));
    if (nq == 0) Die("--queries=0: want at least one query");
    if (dim <= 0) Die(absl::StrCat("--dim=", dim, ": want >= 1"));
    absl::StatusOr<DriftBenchPreset> preset = ParseDriftBenchPreset(absl::GetFlag(FLAGS_preset));
    if (!preset.ok()) Die(absl::StrCat("--preset: ", preset.status().message()));
    DriftBenchConfig config = DriftBenchPresetConfig(*preset);
    config.num_targets = n;
    config.num_queries = std::max<size_t>(nq, absl::GetFlag(FLAGS_drift_queries));
    config.dim = dim;
    config.seed = seed;
    if (absl::GetFlag(FLAGS_latent_dim) > 0) config.latent_dim = absl::GetFlag(FLAGS_latent_dim);
    if (absl::GetFlag(FLAGS_num_clusters) > 0) config.num_clusters = absl::GetFlag(FLAGS_num_clusters);
    if (absl::GetFlag(FLAGS_cluster_spread) > 0) config.cluster_spread = absl::GetFlag(FLAGS_cluster_spread);
    data_note = absl::StrCat("generator, preset ", DriftBenchPresetName(*preset), " (latent_dim ",
                             config.latent_dim, ", ", config.num_clusters, " clusters, spread ",
                             config.cluster_spread, ")");
    Log("data: " + data_note);
    gen = std::make_unique<DriftBench>(config);
    x0 = gen->Targets(0);
    q_all = gen->Queries(0);
    const std::string export_dir = absl::GetFlag(FLAGS_export_dir);
    if (!export_dir.empty()) {
      std::filesystem::create_directories(export_dir);
      const std::vector<float> qx(q_all.begin(), q_all.begin() + nq * dim);
      WriteOrDie(export_dir + "/targets.npy", client::SaveNpy(export_dir + "/targets.npy", n, dim, x0));
      WriteOrDie(export_dir + "/queries.npy", client::SaveNpy(export_dir + "/queries.npy", nq, dim, qx));
      WriteOrDie(export_dir + "/targets_f16.npy", SaveNpyHalf(export_dir + "/targets_f16.npy", n, dim, x0));
      WriteOrDie(export_dir + "/queries_f16.npy", SaveNpyHalf(export_dir + "/queries_f16.npy", nq, dim, qx));
      WriteOrDie(export_dir + "/targets.fvecs", SaveFvecs(export_dir + "/targets.fvecs", n, dim, x0));
      WriteOrDie(export_dir + "/queries.fvecs", SaveFvecs(export_dir + "/queries.fvecs", nq, dim, qx));
      return 0;
    }
  }
  int ivf_nlist = absl::GetFlag(FLAGS_ivf_nlist);
  if (ivf_nlist < 0) Die(absl::StrCat("--ivf_nlist=", ivf_nlist, ": want >= 0"));
  if (ivf_nlist == 0) ivf_nlist = std::max(1, static_cast<int>(std::lround(4 * std::sqrt(double(n)))));
  PeerOptions po{.threads = threads,
                 .ivf_nlist = ivf_nlist,
                 .hnsw_m = absl::GetFlag(FLAGS_hnsw_m),
                 .hnsw_ef_construction = absl::GetFlag(FLAGS_hnsw_ef_construction)};
  Log(absl::StrCat("data: n=", n, " dim=", dim, " queries=", nq, " k=", k,
                   " threads=", threads, " seed=", seed));
  const std::vector<float> q0(q_all.begin(), q_all.begin() + nq * dim);
  std::vector<int64_t> truth = Truth(x0.data(), n, dim, q0.data(), nq, k, threads);

  // The re-encoded subset for the update test.
  const size_t n_upd = std::max<size_t>(1, static_cast<size_t>(n * absl::GetFlag(FLAGS_update_fraction)));
  std::vector<size_t> upd_rows(n);
  std::iota(upd_rows.begin(), upd_rows.end(), 0);
  {
    Rng rng(seed, 99);
    for (size_t i = 0; i < n_upd; ++i) std::swap(upd_rows[i], upd_rows[i + rng.Below(n - i)]);
    upd_rows.resize(n_upd);
  }
  // Re-encoded by the generator's encoder one step on; on files, which have
  // no encoder, a perturbed copy stands in (x + Gaussian noise of 10% of
  // its norm, rescaled to the row's norm): the cost of absorbing it is the
  // same, and the recall after it is against the truth over the new rows.
  std::vector<float> x_upd;
  if (gen) {
    x_upd = gen->EncodeTargets(1, upd_rows);
  } else {
    Rng noise(seed, 98);
    x_upd.resize(n_upd * dim);
    for (size_t i = 0; i < n_upd; ++i) {
      const float* x = &x0[upd_rows[i] * dim];
      double norm2 = 0, new2 = 0;
      for (int j = 0; j < dim; ++j) norm2 += double{x[j]} * x[j];
      const double sigma = 0.1 * std::sqrt(norm2 / dim);
      for (int j = 0; j < dim; ++j) {
        x_upd[i * dim + j] = static_cast<float>(x[j] + sigma * noise.Normal());
        new2 += double{x_upd[i * dim + j]} * x_upd[i * dim + j];
      }
      const double scale = new2 > 0 ? std::sqrt(norm2 / new2) : 1;
      for (int j = 0; j < dim; ++j) x_upd[i * dim + j] = static_cast<float>(x_upd[i * dim + j] * scale);
    }
  }
  const char* upd_what = gen ? "re-encoded" : "perturbed (10% noise)";
  const std::vector<int64_t> upd_ids(upd_rows.begin(), upd_rows.end());
  std::vector<float> x1 = x0;
  for (size_t i = 0; i < n_upd; ++i) {
    std::copy_n(&x_upd[i * dim], dim, &x1[upd_rows[i] * dim]);
  }
  const std::vector<int64_t> truth1 = Truth(x1.data(), n, dim, q0.data(), nq, k, threads);

  // ---------------------------------------------- recall vs queries/s
  std::vector<Curve> curves;
  double exact_qps = 0, tree_exact_qps = 0;
  if (Enabled("curves")) {
    for (absl::string_view name_view : absl::StrSplit(absl::GetFlag(FLAGS_peers), ',')) {
      const std::string name(name_view);
      Curve c;
      c.index = name;
      auto index = Make(name, po);
      c.knob_name = index->knob_name();
      const size_t rss0 = RssBytes();
      auto start = Clock::now();
      index->Build(x0.data(), n, dim);
      c.build_s = Seconds(start);
      c.rss_bytes = static_cast<double>(RssBytes()) - rss0;
      c.mem_bytes = index->MemoryBytes();
      Log(absl::StrCat(name, ": built in ", c.build_s, " s"));
      for (int knob : index->knobs(k)) {
        start = Clock::now();
        auto got = index->Search(q0.data(), nq, k, knob);
        const double qps = nq / Seconds(start);
        const double r = Recall(got, truth, nq, k);
        c.knobs.push_back(knob);
        c.recall.push_back(r);
        c.qps.push_back(qps);
        if (c.knob95 < 0 && r >= 0.95) c.knob95 = knob;
        Log(absl::StrCat(name, " ", c.knob_name, "=", knob, ": recall ", r, " qps ", qps));
        if (r >= 0.999) break;  // flat from here
      }
      if (name == "negmine-exact") exact_qps = c.qps.front();
      if (name == "negmine-tree-exact") tree_exact_qps = c.qps.front();
      // Absorb re-encoded embeddings for update_fraction of the targets.
      const int knob = c.knob95 >= 0 ? c.knob95 : c.knobs.back();
      c.update_recall_before = Recall(index->Search(q0.data(), nq, k, knob), truth, nq, k);
      start = Clock::now();
      c.update_in_place = index->Update(upd_ids, x_upd.data());
      if (c.update_in_place) {
        c.update_s = Seconds(start);
        c.update_recall_after =
            Recall(index->Search(q0.data(), nq, k, knob), truth1, nq, k);
      } else {
        // No in-place update: absorbing means a full rebuild over the same
        // number of targets, whose cost is the build time measured above.
        c.update_s = c.build_s;
      }
      Log(absl::StrCat(name, ": absorbed ", n_upd, " ", upd_what, " targets in ", c.update_s,
                       " s (", c.update_in_place ? "in place" : "rebuild", "), recall ",
                       c.update_recall_before, " -> ", c.update_recall_after));
      curves.push_back(std::move(c));
    }
  }

  // ------------------------------------------------------- sampling
  std::vector<SamplingFigures> sampling;
  if (Enabled("sampling")) {
    std::vector<uint64_t> ids(n);
    std::iota(ids.begin(), ids.end(), 0);
    IndexOptions o{.dim = dim, .metric = Metric::kInnerProduct, .backend = Backend::kCpu};
    o.tree.background_rebuild = false;
    auto exact = CreateIndex(o).value();
    o.kind = IndexKind::kTree;
    auto tree = CreateIndex(o).value();
    if (!exact->Upsert(ids, x0, 0).ok() || !tree->Upsert(ids, x0, 0).ok()) std::abort();
    const size_t sq = std::min(nq, absl::GetFlag(FLAGS_sample_queries));
    const int rounds = absl::GetFlag(FLAGS_sample_rounds);
    struct Row {
      const char* label;
      const Index* index;
      Sampler sampler;
      int rounds;
      size_t throughput_queries;
    };
    // The proposal sampler's throughput is measured on the whole batch, as
    // top-k's is. The exact samplers cost up to a brute-force pass per query
    // at low temperature: fewer rounds and queries.
    const Row rows[] = {
        {"negmine-exact (exact softmax)", exact.get(), Sampler::kExact, rounds, sq},
        {"negmine-tree proposal", tree.get(), Sampler::kProposal, rounds, nq},
        {"negmine-tree exact (rejection)", tree.get(), Sampler::kExact, std::max(1, rounds / 10), sq}};
    for (double tau : {0.05, 0.1}) {
     for (const Row& row : rows) {
      sampling.push_back(MeasureSampling(row.label, *row.index, row.sampler, x0, n, dim, q0,
                                         sq, row.throughput_queries, k, tau, row.rounds,
                                         threads));
      const auto& s = sampling.back();
      Log(absl::StrCat("sampling ", row.label, " tau=", tau, ": grad error top-k ", s.topk_grad_error,
                       " samples ", s.sample_grad_error, "; chi2 ", s.chi2, " (df ", s.chi2_df,
                       ", crit ", s.chi2_critical, ") tv ", s.tv, "; ", s.sample_qps, " q/s"));
     }
    }
  }

  // ---------------------------------------------------------- drift
  // Every evaluated step t: the stale index, a static index rebuilt over
  // freshly re-encoded targets every R steps, and negmine's drift-corrected
  // tree at several m (each re-encoding only its m landmarks at step t; one
  // variant also re-encodes a budget of targets every step). Recall@k of
  // exact top-k against brute force over the step-t targets, and the KL of
  // each one's softmax from the current model's.
  struct DriftVariant {
    std::string name;
    int m = 0;
    bool budget = false;
    std::unique_ptr<BenchIndex> index;
    double fit_s = 0, apply_s = 0;
    int updates = 0;
    double qps_before = 0, qps_after = 0, qps_rebuilt = 0, rebuild_s = 0;
  };
  struct DriftPoint {
    int step;
    double stale, rebuilt;
    std::vector<double> negmine;
    double kl_stale = 0, kl_rebuilt = 0;
    std::vector<double> kl_negmine;
  };
  std::vector<DriftVariant> variants;
  std::vector<DriftPoint> drift;
  const double kl_tau = absl::GetFlag(FLAGS_kl_temperature);
  const bool run_drift = Enabled("drift") && gen != nullptr;
  if (Enabled("drift") && !run_drift) {
    Log("drift: skipped: the data are files, and the drift figures need the generator's "
        "drifting encoder");
  }
  if (run_drift) {
    const size_t dq = std::min<size_t>(absl::GetFlag(FLAGS_drift_queries), q_all.size() / dim);
    const size_t kq = std::min<size_t>(absl::GetFlag(FLAGS_kl_queries), dq);
    const int R = absl::GetFlag(FLAGS_rebuild_every);
    const size_t budget = static_cast<size_t>(n * absl::GetFlag(FLAGS_reencode_budget));
    auto stale = MakeFaissFlat(po);
    stale->Build(x0.data(), n, dim);
    auto rebuilt = MakeFaissFlat(po);
    rebuilt->Build(x0.data(), n, dim);
    std::vector<float> x_rebuilt = x0;
    for (absl::string_view f :
         absl::StrSplit(absl::GetFlag(FLAGS_drift_landmarks), ',', absl::SkipEmpty())) {
      int factor = 0;
      if (!absl::SimpleAtoi(f, &factor) || factor <= 0) {
        Die(absl::StrCat("--drift_landmarks: '", f, "' is not a positive integer"));
      }
      const int m = factor * dim;
      variants.push_back({.name = absl::StrCat("m=", f, "d"), .m = m});
    }
    if (budget > 0 && !variants.empty()) {
      variants.push_back({.name = absl::StrCat(variants[0].name, " + re-encode ",
                                               absl::GetFlag(FLAGS_reencode_budget) * 100, "%/step"),
                          .m = variants[0].m, .budget = true});
    }
    const std::vector<float> q_eval(q_all.begin(), q_all.begin() + dq * dim);
    for (DriftVariant& v : variants) {
      v.index = MakeNegmineDrift(threads, v.m);
      v.index->Build(x0.data(), n, dim);
    }
    // Exact top-k queries/s of the first variant's tree (after a warm-up).
    auto tree_qps = [&]() {
      variants[0].index->Search(q_eval.data(), dq, k, 0);
      const auto t0 = Clock::now();
      variants[0].index->Search(q_eval.data(), dq, k, 0);
      return dq / Seconds(t0);
    };
    variants[0].qps_before = tree_qps();
    // The budget variant re-encodes the least recently encoded targets first
    // (a round-robin over a fixed random order).
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    Rng rng(seed, 123);
    for (size_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng.Below(i + 1)]);
    size_t cursor = 0;
    // Mean KL(p_now || p) over the first kq queries at temperature kl_tau.
    auto kl = [&](const std::vector<float>& now, const float* x, const std::vector<float>& q) {
      using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
      Eigen::Map<const RowMatrix> qs(q.data(), kq, dim), xn(now.data(), n, dim), xm(x, n, dim);
      const RowMatrix s_now = qs * xn.transpose(), s = qs * xm.transpose();
      double total = 0;
      for (size_t i = 0; i < kq; ++i) {
        auto log_softmax = [&](const RowMatrix& m) {
          Eigen::ArrayXd a = m.row(i).cast<double>().array() / kl_tau;
          const double mx = a.maxCoeff();
          return (a - mx - std::log((a - mx).exp().sum())).eval();
        };
        const Eigen::ArrayXd lp = log_softmax(s_now), lq = log_softmax(s);
        total += (lp.exp() * (lp - lq)).sum();
      }
      return total / kq;
    };
    std::vector<uint64_t> all_ids(n);
    std::iota(all_ids.begin(), all_ids.end(), 0);
    for (int t = 0; t <= absl::GetFlag(FLAGS_drift_steps); ++t) {
      if (t > 0 && budget > 0) {
        std::vector<size_t> rows(budget);
        for (size_t i = 0; i < budget; ++i) rows[i] = order[(cursor + i) % n];
        cursor += budget;
        const std::vector<float> enc = gen->EncodeTargets(t, rows);
        for (DriftVariant& v : variants) {
          if (!v.budget) continue;
          const absl::Status st = v.index->core()->Upsert(
              std::vector<uint64_t>(rows.begin(), rows.end()), enc, t);
          if (!st.ok()) Die(st.ToString());
        }
      }
      const bool eval = t % absl::GetFlag(FLAGS_drift_every) == 0;
      const bool rebuild = t > 0 && t % R == 0;
      if (!eval && !rebuild) continue;
      const std::vector<float> xt = gen->Targets(t);
      if (rebuild) {
        rebuilt->Build(xt.data(), n, dim);
        x_rebuilt = xt;
      }
      if (!eval) continue;
      const std::vector<float> qt_all = gen->Queries(t);
      const std::vector<float> qt(qt_all.begin(), qt_all.begin() + dq * dim);
      const auto tt = Truth(xt.data(), n, dim, qt.data(), dq, k, threads);
      DriftPoint pnt{t, Recall(stale->Search(qt.data(), dq, k, 0), tt, dq, k),
                     Recall(rebuilt->Search(qt.data(), dq, k, 0), tt, dq, k)};
      pnt.kl_stale = kl(xt, x0.data(), qt);
      pnt.kl_rebuilt = kl(xt, x_rebuilt.data(), qt);
      for (DriftVariant& v : variants) {
        Index& idx = *v.index->core();
        if (t > 0) {
          absl::StatusOr<LandmarkSet> lm = idx.GetLandmarks();
          if (!lm.ok()) Die(lm.status().ToString());
          const std::vector<float> g =
              gen->EncodeTargets(t, std::vector<size_t>(lm->ids.begin(), lm->ids.end()));
          absl::StatusOr<DriftReport> rep = idx.ApplyDrift(
              {.model_step = t, .landmark_epoch = lm->epoch, .landmark_embeddings = g});
          if (!rep.ok()) Die(rep.status().ToString());
          v.fit_s += rep->fit_seconds;
          v.apply_s += rep->apply_seconds;
          ++v.updates;
        }
        pnt.negmine.push_back(Recall(v.index->Search(qt.data(), dq, k, 0), tt, dq, k));
        std::vector<float> scored;
        const absl::Status st = idx.GetScored(all_ids, &scored);
        if (!st.ok()) Die(st.ToString());
        pnt.kl_negmine.push_back(kl(xt, scored.data(), qt));
      }
      drift.push_back(pnt);
      std::string line = absl::StrCat("drift step ", t, ": recall stale ", pnt.stale,
                                      " rebuilt/", R, " ", pnt.rebuilt);
      for (size_t i = 0; i < variants.size(); ++i) {
        absl::StrAppend(&line, " ", variants[i].name, " ", pnt.negmine[i]);
      }
      absl::StrAppend(&line, "; KL stale ", pnt.kl_stale, " rebuilt ", pnt.kl_rebuilt);
      for (size_t i = 0; i < variants.size(); ++i) {
        absl::StrAppend(&line, " ", variants[i].name, " ", pnt.kl_negmine[i]);
      }
      Log(line);
    }
    variants[0].qps_after = tree_qps();
    if (auto* tree = dynamic_cast<TreeIndex*>(variants[0].index->core())) {
      const auto t0 = Clock::now();
      tree->RebuildNow();
      variants[0].rebuild_s = Seconds(t0);
      variants[0].qps_rebuilt = tree_qps();
    }
  }

  // ------------------------------------------------------------- GCBS
  // Examples: (query, positive) pairs, the positives drift-bench targets and
  // the queries their noisy copies (noise of norm about 0.5). The streamed
  // order is random, so "before" is random batching.
  struct GcbsFigures {
    size_t n = 0, dense_n = 0;
    double seconds = 0, random = 0, gcbs = 0;
    int64_t bw_before = 0, bw_after = 0;
    size_t edges = 0, components = 0;
    double sub_random = 0, sub_sparse = 0, sub_dense = 0, sub_sparse_s = 0, sub_dense_s = 0;
  } gcbs;
  if (Enabled("batches")) {
    const size_t bn = std::min<size_t>(absl::GetFlag(FLAGS_batches_n) ? absl::GetFlag(FLAGS_batches_n) : n, n);
    const int bsz = absl::GetFlag(FLAGS_batch_size);
    std::vector<float> pos(x0.begin(), x0.begin() + bn * dim), qry(bn * dim);
    Rng rng(seed, 777);
    const double sigma = 0.5 / std::sqrt(static_cast<double>(dim));
    for (size_t i = 0; i < qry.size(); ++i) qry[i] = pos[i] + static_cast<float>(sigma * rng.Normal());
    auto run = [&](size_t m, bool dense, double* seconds) {
      const auto t0 = Clock::now();
      const BatchOptions o{.batch_size = bsz, .threads = threads};
      absl::Span<const float> q(qry.data(), m * dim), p(pos.data(), m * dim);
      absl::StatusOr<BatchAssignment> a =
          dense ? AssignBatchesDense(q, p, dim, o) : AssignBatches(q, p, dim, o);
      if (!a.ok()) Die(a.status().ToString());
      *seconds = Seconds(t0);
      return *std::move(a);
    };
    const BatchAssignment full = run(bn, false, &gcbs.seconds);
    gcbs.n = bn;
    gcbs.random = full.in_batch_similarity_before;
    gcbs.gcbs = full.in_batch_similarity_after;
    gcbs.bw_before = full.bandwidth_before;
    gcbs.bw_after = full.bandwidth_after;
    gcbs.edges = full.edges;
    gcbs.components = full.components;
    Log(absl::StrCat("gcbs n=", bn, " B=", bsz, ": ", gcbs.seconds, " s; in-batch similarity ",
                     gcbs.random, " -> ", gcbs.gcbs, "; bandwidth ", gcbs.bw_before, " -> ",
                     gcbs.bw_after));
    gcbs.dense_n = std::min<size_t>(absl::GetFlag(FLAGS_batches_dense_n), bn);
    // The dense reference uses the same k nearest neighbours (exactly).
    const BatchAssignment sub_sparse = run(gcbs.dense_n, false, &gcbs.sub_sparse_s);
    const BatchAssignment sub_dense = run(gcbs.dense_n, true, &gcbs.sub_dense_s);
    gcbs.sub_random = sub_sparse.in_batch_similarity_before;
    gcbs.sub_sparse = sub_sparse.in_batch_similarity_after;
    gcbs.sub_dense = sub_dense.in_batch_similarity_after;
    Log(absl::StrCat("gcbs subsample n=", gcbs.dense_n, ": random ", gcbs.sub_random, " sparse ",
                     gcbs.sub_sparse, " (", gcbs.sub_sparse_s, " s) dense ", gcbs.sub_dense, " (",
                     gcbs.sub_dense_s, " s)"));
  }

  // ----------------------------------------------------- end to end
  E2eFigures e2e;
  const std::string server_bin = absl::GetFlag(FLAGS_server_bin);
  if (!server_bin.empty() && Enabled("e2e")) {
    e2e = MeasureEndToEnd(server_bin, x0, n, dim, q0, nq, k, threads,
                          absl::GetFlag(FLAGS_e2e_batches), truth, tree_exact_qps);
    Log(absl::StrCat("end to end: upsert ", e2e.upsert_rows_per_s, " rows/s; MineStream ",
                     e2e.stream_qps, " q/s vs in-process ", e2e.inprocess_qps,
                     " q/s; recall ", e2e.recall));
  }

  // --------------------------------------------------------- output
  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  std::filesystem::create_directories(out_dir);
  std::vector<std::string> curve_json, sampling_json, drift_json;
  for (const Curve& c : curves) {
    auto ints = [](const std::vector<int>& v) { return "[" + absl::StrJoin(v, ", ") + "]"; };
    auto dbls = [](const std::vector<double>& v) { return "[" + absl::StrJoin(v, ", ") + "]"; };
    curve_json.push_back(Json()
                             .Str("index", c.index)
                             .Str("knob", c.knob_name)
                             .Raw("knobs", ints(c.knobs))
                             .Raw("recall", dbls(c.recall))
                             .Raw("qps", dbls(c.qps))
                             .Num("build_s", c.build_s)
                             .Num("memory_bytes_per_target", c.mem_bytes / n)
                             .Num("rss_bytes_per_target", c.rss_bytes / n)
                             .Num("update_s", c.update_s)
                             .Raw("update_in_place", c.update_in_place ? "true" : "false")
                             .Num("update_recall_before", c.update_recall_before)
                             .Num("update_recall_after", c.update_recall_after)
                             .Done());
  }
  for (const auto& s : sampling) {
    sampling_json.push_back(Json()
                                .Str("sampler", s.sampler)
                                .Num("tau", s.tau)
                                .Num("topk_grad_error", s.topk_grad_error)
                                .Num("sample_grad_error", s.sample_grad_error)
                                .Num("chi2", s.chi2)
                                .Num("chi2_df", s.chi2_df)
                                .Num("chi2_critical_p001", s.chi2_critical)
                                .Num("tv_10_equal_mass_bins", s.tv)
                                .Num("sample_qps", s.sample_qps)
                                .Done());
  }
  for (const auto& d : drift) {
    Json j;
    j.Num("step", d.step).Num("stale", d.stale).Num("rebuilt_every_r", d.rebuilt);
    j.Num("kl_stale", d.kl_stale).Num("kl_rebuilt_every_r", d.kl_rebuilt);
    for (size_t i = 0; i < variants.size(); ++i) {
      j.Num(absl::StrCat("negmine ", variants[i].name), d.negmine[i]);
      j.Num(absl::StrCat("kl negmine ", variants[i].name), d.kl_negmine[i]);
    }
    drift_json.push_back(j.Done());
  }
  std::vector<std::string> drift_update_json;
  for (const auto& v : variants) {
    drift_update_json.push_back(Json()
                             .Str("variant", v.name)
                             .Num("landmarks", v.m)
                             .Num("fit_seconds_per_update", v.updates ? v.fit_s / v.updates : 0)
                             .Num("apply_seconds_per_update", v.updates ? v.apply_s / v.updates : 0)
                             .Num("tree_exact_qps_before", v.qps_before)
                             .Num("tree_exact_qps_after", v.qps_after)
                             .Num("tree_exact_qps_rebuilt", v.qps_rebuilt)
                             .Num("rebuild_seconds", v.rebuild_s)
                             .Done());
  }
  const double total_s = Seconds(bench_start);
  std::ofstream json(out_dir + "/results.json");
  json << "{\n  \"config\": "
       << Json()
              .Num("n", n)
              .Num("dim", dim)
              .Num("queries", nq)
              .Num("k", k)
              .Num("threads", threads)
              .Num("seed", seed)
              .Str("data", data_note)
              .Num("update_fraction", absl::GetFlag(FLAGS_update_fraction))
              .Num("rebuild_every", absl::GetFlag(FLAGS_rebuild_every))
              .Num("reencode_budget", absl::GetFlag(FLAGS_reencode_budget))
              .Num("hnsw_m", po.hnsw_m)
              .Num("hnsw_ef_construction", po.hnsw_ef_construction)
              .Num("ivf_nlist", po.ivf_nlist)
              .Str("flags", absl::GetFlag(FLAGS_flags_note))
              .Num("total_seconds", total_s)
              .Done()
       << ",\n  \"curves\": " << JsonArray(curve_json)
       << ",\n  \"sampling\": " << JsonArray(sampling_json)
       << ",\n  \"drift\": " << JsonArray(drift_json)
       << ",\n  \"drift_updates\": " << JsonArray(drift_update_json)
       << ",\n  \"batches\": "
       << Json()
              .Num("examples", gcbs.n)
              .Num("batch_size", absl::GetFlag(FLAGS_batch_size))
              .Num("seconds", gcbs.seconds)
              .Num("in_batch_similarity_random", gcbs.random)
              .Num("in_batch_similarity_gcbs", gcbs.gcbs)
              .Num("bandwidth_before", gcbs.bw_before)
              .Num("bandwidth_after", gcbs.bw_after)
              .Num("edges", gcbs.edges)
              .Num("components", gcbs.components)
              .Num("subsample", gcbs.dense_n)
              .Num("subsample_random", gcbs.sub_random)
              .Num("subsample_sparse", gcbs.sub_sparse)
              .Num("subsample_dense", gcbs.sub_dense)
              .Num("subsample_sparse_seconds", gcbs.sub_sparse_s)
              .Num("subsample_dense_seconds", gcbs.sub_dense_s)
              .Done()
       << ",\n  \"end_to_end\": "
       << Json()
              .Num("upsert_rows_per_s", e2e.upsert_rows_per_s)
              .Num("stream_qps", e2e.stream_qps)
              .Num("inprocess_qps", e2e.inprocess_qps)
              .Num("recall", e2e.recall)
              .Done()
       << "\n}\n";

  // Markdown.
  std::ostringstream md;
  md << "Drift bench: N = " << n << ", d = " << dim << ", " << nq << " queries per batch, k = "
     << k << ", " << threads << " threads, seed " << seed << ". Data: " << data_note
     << ". Build flags: "
     << absl::GetFlag(FLAGS_flags_note) << ". Total " << static_cast<int>(total_s) << " s.\n\n";
  if (Enabled("curves")) {
    md << "### Recall@" << k << " against queries/s\n\n"
       << "| index | knob | recall@k | queries/s | vs brute force (negmine-exact) |\n"
       << "| --- | --- | --- | --- | --- |\n";
    for (const Curve& c : curves) {
      for (size_t i = 0; i < c.knobs.size(); ++i) {
        md << "| " << c.index << " | " << (c.knob_name.empty() ? "-" : absl::StrCat(c.knob_name, "=", c.knobs[i]))
           << " | " << absl::StrFormat("%.4f", c.recall[i]) << " | "
           << absl::StrFormat("%.0f", c.qps[i]) << " | "
           << (exact_qps > 0 ? absl::StrFormat("%.2fx", c.qps[i] / exact_qps) : "-") << " |\n";
      }
    }
    md << "\n### Build, memory and updates\n\n"
       << "| index | build s | bytes/target (own) | bytes/target (RSS) | absorb " << n_upd
       << " " << upd_what << " s | how | recall before -> after |\n| --- | --- | --- | --- | --- | --- | --- |\n";
    for (const Curve& c : curves) {
      md << "| " << c.index << " | " << absl::StrFormat("%.2f", c.build_s) << " | "
         << absl::StrFormat("%.0f", c.mem_bytes / n) << " | "
         << absl::StrFormat("%.0f", c.rss_bytes / n) << " | "
         << absl::StrFormat("%.3f", c.update_s) << " | "
         << (c.update_in_place ? "in place" : "full rebuild (= build time)") << " | "
         << (std::isnan(c.update_recall_after)
                 ? absl::StrFormat("%.4f -> (a fresh build)", c.update_recall_before)
                 : absl::StrFormat("%.4f -> %.4f", c.update_recall_before, c.update_recall_after))
         << " |\n";
    }
  }
  if (Enabled("sampling")) {
    md << "\n### Sampling (" << std::min(nq, absl::GetFlag(FLAGS_sample_queries))
       << " queries; grad error = relative error of the estimate of grad_q log Z from k = " << k
       << " negatives)\n\n"
       << "| sampler | tau | grad error, brute-force top-" << k << " | grad error, " << k
       << " samples (self-normalized) | chi2 (df) vs p=0.001 critical | TV, 10 equal-mass bins | "
          "sample queries/s | vs brute-force top-k queries/s |\n"
       << "| --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for (const auto& s : sampling) {
      md << "| " << s.sampler << " | " << s.tau << " | " << absl::StrFormat("%.3f", s.topk_grad_error) << " | "
         << absl::StrFormat("%.3f", s.sample_grad_error) << " | "
         << absl::StrFormat("%.1f (%d) vs %.1f", s.chi2, s.chi2_df, s.chi2_critical) << " | "
         << absl::StrFormat("%.4f", s.tv) << " | " << absl::StrFormat("%.0f", s.sample_qps)
         << " | " << (exact_qps > 0 ? absl::StrFormat("%.1fx", s.sample_qps / exact_qps) : "-")
         << " |\n";
    }
  }
  if (Enabled("drift") && !run_drift) {
    md << "\n### Recall@" << k << " and KL under drift\n\nSkipped: the data are files, and "
       << "these figures need the generator's drifting encoder.\n";
  }
  if (run_drift) {
    md << "\n### Recall@" << k << " and KL under drift\n\n"
       << "Exact top-" << k << " against brute force over the step-t targets. negmine's "
       << "tree (cosine) re-encodes only its m landmarks at each evaluated step and "
       << "corrects every target (Nystrom, displacement form). KL: mean KL(p_now || p) of "
       << "the softmax at tau = " << kl_tau << " over all targets, " << absl::GetFlag(FLAGS_kl_queries)
       << " queries; the oracle (fresh embeddings) has recall 1 and KL 0.\n\n"
       << "| step | static | static, rebuilt every " << absl::GetFlag(FLAGS_rebuild_every) << " steps";
    for (const auto& v : variants) md << " | negmine " << v.name;
    md << " | KL static | KL rebuilt";
    for (const auto& v : variants) md << " | KL " << v.name;
    md << " |\n|";
    for (size_t i = 0; i < 5 + 2 * variants.size(); ++i) md << " --- |";
    md << "\n";
    for (const auto& d : drift) {
      md << "| " << d.step << " | " << absl::StrFormat("%.4f", d.stale) << " | "
         << absl::StrFormat("%.4f", d.rebuilt);
      for (double r : d.negmine) md << " | " << absl::StrFormat("%.4f", r);
      md << " | " << absl::StrFormat("%.4f", d.kl_stale) << " | " << absl::StrFormat("%.4f", d.kl_rebuilt);
      for (double r : d.kl_negmine) md << " | " << absl::StrFormat("%.4f", r);
      md << " |\n";
    }
    md << "\n| variant | landmarks | fit s / update | apply s / update (all " << n << " targets + tree) |\n"
       << "| --- | --- | --- | --- |\n";
    for (const auto& v : variants) {
      md << "| " << v.name << " | " << v.m << " | "
         << absl::StrFormat("%.3f", v.updates ? v.fit_s / v.updates : 0) << " | "
         << absl::StrFormat("%.3f", v.updates ? v.apply_s / v.updates : 0) << " |\n";
    }
    if (!variants.empty()) {
      md << "\nPer-query cost of the correction (" << variants[0].name << ", exact top-" << k
         << ", one thread per batch part): " << absl::StrFormat("%.0f", variants[0].qps_before)
         << " queries/s before any drift update, " << absl::StrFormat("%.0f", variants[0].qps_after)
         << " after the last (same structure and centers, bounds refit to the moved targets), "
         << absl::StrFormat("%.0f", variants[0].qps_rebuilt) << " after a rebuild ("
         << absl::StrFormat("%.1f", variants[0].rebuild_s) << " s; the background rebuild "
         << "does this off the query path once the leaves' radii have grown by half).\n";
    }
  }
  if (Enabled("batches")) {
    md << "\n### Batch assignment (GCBS), B = " << absl::GetFlag(FLAGS_batch_size) << "\n\n"
       << "Examples: the targets as positives, queries their noisy copies; the streamed order "
       << "is random. In-batch similarity: sum over batches of sum_{i != j} cos(q_i, p_j).\n\n"
       << "| examples | method | seconds | in-batch similarity | vs random | graph |\n"
       << "| --- | --- | --- | --- | --- | --- |\n"
       << "| " << gcbs.n << " | random batches | - | " << absl::StrFormat("%.0f", gcbs.random)
       << " | 1x | - |\n"
       << "| " << gcbs.n << " | GCBS, kNN graph (k = 16) + RCM | " << absl::StrFormat("%.1f", gcbs.seconds)
       << " | " << absl::StrFormat("%.0f", gcbs.gcbs) << " | "
       << absl::StrFormat("%.1fx", gcbs.gcbs / gcbs.random) << " | " << gcbs.edges << " edges, "
       << gcbs.components << " components, bandwidth " << gcbs.bw_before << " -> " << gcbs.bw_after
       << " |\n"
       << "| " << gcbs.dense_n << " | random batches | - | " << absl::StrFormat("%.0f", gcbs.sub_random)
       << " | 1x | - |\n"
       << "| " << gcbs.dense_n << " | GCBS, kNN graph + RCM | " << absl::StrFormat("%.1f", gcbs.sub_sparse_s)
       << " | " << absl::StrFormat("%.0f", gcbs.sub_sparse) << " | "
       << absl::StrFormat("%.1fx", gcbs.sub_sparse / gcbs.sub_random) << " | |\n"
       << "| " << gcbs.dense_n << " | dense reference (exact kNN from X Y^T, O(N^2)) | "
       << absl::StrFormat("%.1f", gcbs.sub_dense_s) << " | " << absl::StrFormat("%.0f", gcbs.sub_dense)
       << " | " << absl::StrFormat("%.1fx", gcbs.sub_dense / gcbs.sub_random) << " | |\n";
  }
  if (!server_bin.empty() && Enabled("e2e")) {
    md << "\n### End to end (gRPC server, C++ client, MineStream, " << threads
       << " streams of " << nq << "-query batches, exact top-k on a tree collection)\n\n"
       << "| upsert rows/s | MineStream queries/s | in-process queries/s (negmine-tree-exact) | server overhead | recall |\n"
       << "| --- | --- | --- | --- | --- |\n"
       << "| " << absl::StrFormat("%.0f", e2e.upsert_rows_per_s) << " | "
       << absl::StrFormat("%.0f", e2e.stream_qps) << " | "
       << absl::StrFormat("%.0f", e2e.inprocess_qps) << " | "
       << (e2e.stream_qps > 0 ? absl::StrFormat("%.1f%%", 100 * (e2e.inprocess_qps / e2e.stream_qps - 1)) : "-")
       << " | " << absl::StrFormat("%.4f", e2e.recall) << " |\n";
  }
  std::ofstream(out_dir + "/results.md") << md.str();
  std::printf("%s", md.str().c_str());
  Log(absl::StrCat("wrote ", out_dir, "/results.json and results.md in ", total_s, " s"));
  return 0;
}

}  // namespace
}  // namespace negmine::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "the drift bench: negmine against brute force, FAISS and hnswlib on the same data.\n"
      "  negmine-bench [--preset=easy|hard] [--n=N --dim=D --queries=Q] [flags]\n"
      "  negmine-bench --targets=X.npy|X.fvecs --queries=Q.npy|Q.fvecs [flags]\n"
      "Writes results.json and results.md to --out_dir. Flags (--helpfull: also absl's):");
  absl::FlagsUsageConfig usage;
  // absl's --help lists the flags of files named after the program; this
  // one's are in drift_bench_main.cc.
  usage.contains_help_flags = [](absl::string_view file) {
    return absl::StrContains(file, "drift_bench_main");
  };
  usage.contains_helpshort_flags = usage.contains_help_flags;
  absl::SetFlagsUsageConfig(usage);
  absl::ParseCommandLine(argc, argv);
  return negmine::bench::Main();
}
