// negmine: the command-line client. Run `negmine help` for the commands.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <deque>
#include <fstream>
#include <map>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/synchronization/mutex.h"
#include "client/negmine_client.h"
#include "client/npy.h"
#include "core/store/drift_bench.h"

// The project version; CMake passes it (NEGMINE_VERSION = PROJECT_VERSION).
#ifndef NEGMINE_VERSION
#error "NEGMINE_VERSION is set by client/CMakeLists.txt"
#endif

namespace negmine::client {
namespace {

constexpr char kVersion[] = NEGMINE_VERSION;

constexpr char kHeader[] = R"(negmine: the negmine command-line client

usage: negmine [global options] COMMAND [options]
       negmine help [COMMAND]      (or negmine COMMAND --help)
       negmine --version

global options:
  --server HOST:PORT   the negmine-server to talk to (default $NEGMINE_SERVER,
                       else 127.0.0.1:50051)
  --tls-ca CA.pem      use TLS, trusting this CA for the server's certificate
                       (default: plaintext)
  --tls-cert C.pem --tls-key K.pem
                       mTLS: this client's certificate and key (default: none)
  --token-file T       send the bearer token in T (default $NEGMINE_TOKEN, else
                       none)
  Every unary call has a 600 s deadline. A call answered UNAVAILABLE (the
  server is starting or recovering) is retried with backoff, 5 attempts in
  all (the waits add up to at most 16.5 s); `negmine health --wait S` first
  waits longer. On a terminal, upserts, drift updates, batch assignment and
  mines of several requests show a progress line on stderr; piped, nothing.
)";

struct CommandHelp {
  const char* name;
  const char* text;
};

constexpr CommandHelp kCommands[] = {
    {"create", R"(  create   --collection C --dim D [options]
           Creates a collection (an index).
           --metric cosine|inner_product       default cosine
           --index tree|exact                  default tree
           --backend auto|cpu|cuda             default auto (CUDA when built
                                               and a GPU is visible)
           --device-dtype float32|float16|bfloat16
                                               default float32 (GPU storage)
           --leaf-size L                       default 64 (tree)
           --branching B                       default 16 (tree)
           --num-landmarks M                   default 4 x dim, at least 64
           --rebase-residual R                 default 0 (never re-base on
                                               residual)
           --rebase-every S                    default 0 (never re-base on
                                               steps)
           (--landmarks M is the old name of --num-landmarks.)
)"},
    {"list", R"(  list     Every collection with its size and version.
)"},
    {"drop", R"(  drop     --collection C
           Removes a collection.
)"},
    {"upsert", R"(  upsert   --collection C (--npy X.npy [--ids I.npy] | --fvecs X.fvecs |
                           --random N [--seed S])
           --model-step T                      default 0
           --id-offset O                       default 0
           --seed S                            default 1 (--random)
           Rows get ids O..O+n-1 unless --ids is given. I.npy holds one id
           per row: uint64 (any id up to 2^64-2), or int64 / int32 (a
           negative entry is refused). 2^64-1 is refused: it is the padding
           of the id arrays negmine writes. --random draws N drift-bench
           targets of the collection's dim.
)"},
    {"delete", R"(  delete   --collection C --ids 1,2,3 [--allow-missing]
           --allow-missing                     default off: an unknown id is
                                               NOT_FOUND and nothing is deleted
)"},
    {"mine", R"(  mine     --collection C (--queries Q.npy | --random-queries N [--seed S])
           --k K                               default 10
           --mode topk|sample|mixed            default topk
           --temperature T                     required for sample and mixed
                                               (T > 0; no default)
           --num-hard H                        default k/2 (mixed)
           --rank-offset R                     default 0
           --with-replacement                  default off (sampling)
           --sample-seed S                     default 0: a fresh random seed
           --sampler proposal|exact            default proposal
           --approximate [--beam-width W]      default exact top-k; W default
                                               0: the server's (256, 128 on
                                               a GPU)
           --log-z [--log-z-width W]           default off; W default 0.01
           --exclude E.npy                     default none
           --json                              default: a readable table
           --out R.npy                         default: none
           --queries-per-request N             default: as many as fit
           --seed S                            default 1 (--random-queries)
           --random-queries draws drift-bench queries; use the seed the
           targets were generated with (the server's --generate_seed).
           E.npy is an n x m integer array of ids to exclude per query:
           uint64 (every id, 2^63 and above too; 2^64-1 is padding) or
           int64 / int32 (negative entries are padding).
           --json prints one object per query per line (query, ids, scores,
           log_q, num_top, index_version; log_z_lo and log_z_hi with
           --log-z). --out writes ids (n x k uint64, missing entries 2^64-1)
           to R.npy, and R.scores.npy and R.log_q.npy (n x k float32) beside
           it; both may be given.
           Any number of queries: one Mine call when they fit one request
           of N queries (by default as many as fit the server's max_batch
           and message limit, read from GetIndexInfo), else one MineStream
           of such requests, two in flight; the results come back in query
           order.
           --log-z also returns each query's certified log Z interval over
           its eligible targets (R.log_z.npy: n x 2 float64 [lo, hi]),
           tightened to W nats. It costs far more than the draws.
)"},
    {"landmarks", R"(  landmarks --collection C [--ids-out L.npy] [--json]
           The ids to re-encode for the next drift update, and their
           landmark epoch (pass it to drift --epoch). --ids-out writes the
           ids (m x 1 uint64) to L.npy; --json prints {"landmark_epoch": E,
           "num_landmarks": m, "ids": [...]} instead of the summary line.
           (--out is the old name of --ids-out.)
)"},
    {"drift", R"(  drift    --collection C --model-step T
           (--landmark-embeddings G.npy --epoch E |
            --linear-a A.npy [--linear-b B.npy] | --simulate [--seed S])
           --seed S                            default 1 (--simulate)
           Applies a drift update: G.npy holds the landmarks' embeddings
           re-encoded at step T (m x dim float, in the order of landmarks
           --ids-out); A.npy (dim x dim) and B.npy (1 x dim) an exact linear
           map new = A old + b. --simulate re-encodes the landmarks with the
           drift-bench encoder at step T, for collections of drift-bench
           targets whose ids are their rows (--random, or the server's
           --generate_targets).
           (--landmarks G.npy is the old name of --landmark-embeddings.)
)"},
    {"batches", R"(  batches  --queries X.npy --positives Y.npy --batch-size B --out batches.npy
           --neighbors K                       default 0: the server's (16)
           --quantile Q                        default 0: off
           --seed S                            default 1
           --keep-batch-order                  default off: batches shuffled
           --sync                              default off: a job
           Global contrastive batch sampling: orders the N training examples
           (row i of X and of Y) so that each batch holds hard negatives of
           each other. Writes the batches as a (num batches x B) uint64
           array of example rows (a short last batch padded with 2^64-1).
           Runs as a server job (AssignBatches async, polled with
           GetBatchJob), whatever the size; --sync waits on one call instead,
           which the server refuses above its --max_sync_batch_examples.
           (--async, the old switch for a job, is accepted and changes
           nothing.)
)"},
    {"snapshot", R"(  snapshot
           Writes a snapshot of every collection now (they are also taken
           periodically); recovery then replays only the log after it.
)"},
    {"health", R"(  health   [--timeout-seconds T] [--wait SECONDS]
           --timeout-seconds T                 default 5
           --wait SECONDS                      default 0: ask once
           grpc.health.v1 Check: exit 0 when the server is SERVING, 1 when
           it is not (or unreachable). For container health checks.
           --wait waits up to SECONDS for SERVING (Health/Watch): through a
           server not listening yet and through its recovery.
)"},
    {"info", R"(  info     [--collection C]
           One collection in detail (tree, drift, the server's limits), or
           every collection in one line each.
)"},
    {"generate", R"(  generate (--targets N | --queries N) --dim D --out X.npy [--seed S]
           --seed S                            default 1
           Writes drift-bench vectors (step 0) to an .npy file; needs no
           server.
)"},
};

constexpr char kFooter[] = R"(
.npy inputs: vectors are float32, float16 or float64 (converted to float32),
1-D or 2-D, C order; ids are uint64, uint32, int64 or int32. .fvecs is, per
vector, an int32 dim then dim float32. Exit codes: 0 ok, 2 bad input, 1 any
other error.
)";

std::string Usage() {
  std::string s = kHeader;
  s += "\ncommands:\n";
  for (const CommandHelp& c : kCommands) s += c.text;
  s += "  help [COMMAND]\n";
  return s + kFooter;
}

// The help of one command, or empty when there is no such command.
std::string CommandUsage(const std::string& name) {
  for (const CommandHelp& c : kCommands) {
    if (name == c.name) return absl::StrCat("usage: negmine [global options] ", name,
                                            " ...\n\n", c.text, kFooter);
  }
  return "";
}

// Parsed `--key value` / `--key=value` options and bare switches.
class Args {
 public:
  static constexpr const char* kSwitches[] = {"json", "with-replacement", "approximate", "log-z",
                                              "allow-missing", "help", "simulate",
                                              "keep-batch-order", "async", "sync",
                                              "version"};

  absl::Status Parse(int argc, char** argv, int start) {
    for (int i = start; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) {
        if (command_.empty()) {
          command_ = a;
          continue;
        }
        if (command_ == "help" && topic_.empty()) {
          topic_ = a;
          continue;
        }
        return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", a, "'"));
      }
      a = a.substr(2);
      const size_t eq = a.find('=');
      if (eq != std::string::npos) {
        values_[a.substr(0, eq)] = a.substr(eq + 1);
        continue;
      }
      bool is_switch = false;
      for (const char* s : kSwitches) is_switch |= a == s;
      if (is_switch) {
        values_[a] = "true";
      } else if (i + 1 < argc) {
        values_[a] = argv[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", a, " needs a value"));
      }
    }
    return absl::OkStatus();
  }

  const std::string& command() const { return command_; }
  // An option's old name still works, with a note on stderr.
  absl::Status Rename(const std::string& old_name, const std::string& new_name,
                      const std::string& why) {
    auto it = values_.find(old_name);
    if (it == values_.end()) return absl::OkStatus();
    if (values_.count(new_name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--", old_name, " is the old name of --", new_name, "; give one of them"));
    }
    std::fprintf(stderr, "negmine: %s --%s is deprecated: use --%s (%s)\n", command_.c_str(),
                 old_name.c_str(), new_name.c_str(), why.c_str());
    values_[new_name] = it->second;
    values_.erase(it);
    return absl::OkStatus();
  }
  const std::string& topic() const { return topic_; }
  bool Has(const std::string& k) const {
    used_.insert(k);
    return values_.count(k) > 0;
  }
  std::string Get(const std::string& k, const std::string& def = "") const {
    used_.insert(k);
    auto it = values_.find(k);
    return it == values_.end() ? def : it->second;
  }
  absl::StatusOr<std::string> Required(const std::string& k) const {
    if (!Has(k)) return absl::InvalidArgumentError(absl::StrCat("--", k, " is required"));
    return Get(k);
  }
  template <typename T>
  absl::StatusOr<T> Number(const std::string& k, T def) const {
    if (!Has(k)) return def;
    T v;
    bool ok;
    if constexpr (std::is_same_v<T, double>) {
      ok = absl::SimpleAtod(Get(k), &v);
    } else if constexpr (std::is_floating_point_v<T>) {
      ok = absl::SimpleAtof(Get(k), &v);
    } else {
      ok = absl::SimpleAtoi(Get(k), &v);
    }
    if (!ok) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", k, " = '", Get(k), "' is not a valid number"));
    }
    return v;
  }
  // Options given but never read by the command: almost always a typo.
  absl::Status CheckAllUsed() const {
    for (auto& [k, v] : values_) {
      if (!used_.count(k)) {
        return absl::InvalidArgumentError(
            absl::StrCat("unknown option --", k, " for '", command_, "'"));
      }
    }
    return absl::OkStatus();
  }

 private:
  std::string command_;
  std::string topic_;  // `help TOPIC`
  std::map<std::string, std::string> values_;
  mutable std::set<std::string> used_;
};

// A progress line on stderr when stderr is a terminal, nothing otherwise
// (piped or redirected output stays clean). Redrawn at most every 100 ms.
// With a total: a bar, the percentage and the counts; without one
// (total 0): the elapsed time only, for a call that reports no progress.
class Progress {
 public:
  Progress(std::string what, uint64_t total, std::string unit)
      : on_(isatty(STDERR_FILENO) == 1),
        what_(std::move(what)),
        unit_(std::move(unit)),
        total_(total),
        start_(std::chrono::steady_clock::now()) {}
  ~Progress() { Finish(); }

  bool on() const { return on_; }
  void Set(uint64_t done) {
    absl::MutexLock lock(&mu_);
    done_ = done;
    Draw(false);
  }
  // A fraction in [0, 1] (a job's own progress) in place of the counts.
  void SetFraction(double f) {
    absl::MutexLock lock(&mu_);
    fraction_ = std::clamp(f, 0.0, 1.0);
    Draw(false);
  }
  void Tick() {
    absl::MutexLock lock(&mu_);
    Draw(false);
  }
  // The last state, then a newline: later output starts on its own line.
  void Finish() {
    absl::MutexLock lock(&mu_);
    if (!on_ || finished_) return;
    finished_ = true;
    if (!drawn_) return;  // over before anything was shown
    Draw(true);
    std::fputc('\n', stderr);
  }

 private:
  void Draw(bool force) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!on_ || finished_ != force) return;
    const auto now = std::chrono::steady_clock::now();
    if (!force && drawn_ && now - last_ < std::chrono::milliseconds(100)) return;
    drawn_ = true;
    last_ = now;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    std::string line = absl::StrCat("\r", what_);
    const double f = fraction_ >= 0 ? fraction_
                     : total_ > 0   ? static_cast<double>(done_) / total_
                                    : -1;
    if (f >= 0) {
      constexpr int kWidth = 30;
      const int full = static_cast<int>(f * kWidth);
      absl::StrAppend(&line, " [", std::string(full, '#'), std::string(kWidth - full, '.'),
                      "] ", absl::StrFormat("%3.0f%%", 100 * f));
      if (fraction_ < 0) absl::StrAppend(&line, " ", done_, "/", total_, " ", unit_);
    }
    absl::StrAppend(&line, absl::StrFormat(" %.1f s", seconds), "\033[K");
    std::fputs(line.c_str(), stderr);
    std::fflush(stderr);
  }

  const bool on_;
  const std::string what_, unit_;
  const uint64_t total_;
  const std::chrono::steady_clock::time_point start_;
  absl::Mutex mu_;
  uint64_t done_ ABSL_GUARDED_BY(mu_) = 0;
  double fraction_ ABSL_GUARDED_BY(mu_) = -1;
  bool drawn_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::chrono::steady_clock::time_point last_ ABSL_GUARDED_BY(mu_);
};

// Redraws `progress` (its elapsed time) from a thread while a call that
// reports no progress of its own runs; stops when destroyed.
class Ticker {
 public:
  explicit Ticker(Progress& progress) : progress_(progress) {
    if (!progress_.on()) return;
    thread_ = std::thread([this] {
      absl::MutexLock lock(&mu_);
      while (!stop_) {
        progress_.Tick();
        mu_.AwaitWithTimeout(absl::Condition(&stop_), absl::Milliseconds(200));
      }
    });
  }
  ~Ticker() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    if (thread_.joinable()) thread_.join();
    progress_.Finish();
  }

 private:
  Progress& progress_;
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

#define CLI_ASSIGN(lhs, expr)                 \
  auto lhs##_or = (expr);                     \
  if (!lhs##_or.ok()) return lhs##_or.status(); \
  auto lhs = std::move(lhs##_or).value()

#define CLI_CHECK(expr)                    \
  do {                                     \
    absl::Status cli_s_ = (expr);          \
    if (!cli_s_.ok()) return cli_s_;       \
  } while (0)

absl::StatusOr<uint32_t> CollectionDim(Client& c, const std::string& collection) {
  CLI_ASSIGN(info, c.GetIndexInfo(collection));
  return info.info().config().dim();
}

std::string MetricText(v1::Metric m) {
  return m == v1::METRIC_COSINE ? "cosine" : "inner_product";
}

void PrintInfo(const v1::CollectionInfo& i) {
  std::printf("%-20s dim=%-6u metric=%-13s index=%-5s backend=%s targets=%" PRIu64
              " version=%" PRIu64 " memory=%.1fMiB\n",
              i.config().name().c_str(), i.config().dim(),
              MetricText(i.config().metric()).c_str(),
              i.config().index_kind() == v1::INDEX_KIND_TREE ? "tree" : "exact",
              i.active_backend() == v1::BACKEND_CUDA ? "cuda" : "cpu",
              i.num_targets(), i.index_version(), i.memory_bytes() / 1048576.0);
}

absl::Status Create(Client& c, const Args& a) {
  CLI_ASSIGN(name, a.Required("collection"));
  CLI_ASSIGN(dim, a.Number<uint32_t>("dim", 0));
  v1::CollectionConfig config;
  config.set_name(name);
  config.set_dim(dim);
  const std::string metric = a.Get("metric", "cosine");
  if (metric == "cosine") {
    config.set_metric(v1::METRIC_COSINE);
  } else if (metric == "inner_product" || metric == "ip") {
    config.set_metric(v1::METRIC_INNER_PRODUCT);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--metric = '", metric, "': use cosine or inner_product"));
  }
  const std::string backend = a.Get("backend", "auto");
  if (backend == "auto") config.set_backend(v1::BACKEND_AUTO);
  else if (backend == "cpu") config.set_backend(v1::BACKEND_CPU);
  else if (backend == "cuda") config.set_backend(v1::BACKEND_CUDA);
  else return absl::InvalidArgumentError(absl::StrCat("--backend = '", backend, "': use auto, cpu or cuda"));
  const std::string dtype = a.Get("device-dtype", "float32");
  if (dtype == "float32") config.set_device_dtype(v1::DTYPE_FLOAT32);
  else if (dtype == "float16") config.set_device_dtype(v1::DTYPE_FLOAT16);
  else if (dtype == "bfloat16") config.set_device_dtype(v1::DTYPE_BFLOAT16);
  else return absl::InvalidArgumentError(absl::StrCat("--device-dtype = '", dtype, "': use float32, float16 or bfloat16"));
  const std::string index = a.Get("index", "tree");
  if (index == "exact") config.set_index_kind(v1::INDEX_KIND_EXACT);
  else if (index == "tree") config.set_index_kind(v1::INDEX_KIND_TREE);
  else return absl::InvalidArgumentError(absl::StrCat("--index = '", index, "': use tree or exact"));
  CLI_ASSIGN(leaf_size, a.Number<uint32_t>("leaf-size", 0));
  CLI_ASSIGN(branching, a.Number<uint32_t>("branching", 0));
  config.mutable_tree()->set_leaf_size(leaf_size);
  config.mutable_tree()->set_branching(branching);
  CLI_ASSIGN(landmarks, a.Number<uint32_t>("num-landmarks", 0));
  CLI_ASSIGN(rebase_residual, a.Number<double>("rebase-residual", 0));
  CLI_ASSIGN(rebase_every, a.Number<int64_t>("rebase-every", 0));
  config.mutable_drift()->set_num_landmarks(landmarks);
  config.mutable_drift()->set_rebase_residual(rebase_residual);
  config.mutable_drift()->set_rebase_every_steps(rebase_every);
  CLI_CHECK(a.CheckAllUsed());
  CLI_ASSIGN(info, c.CreateCollection(config));
  std::printf("created ");
  PrintInfo(info);
  return absl::OkStatus();
}

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

void PrintTable(const v1::MineResponse& r, size_t first_query, bool log_z) {
  for (int qi = 0; qi < r.results_size(); ++qi) {
    const v1::QueryNegatives& q = r.results(qi);
    std::printf("\nquery %zu", first_query + qi);
    if (log_z) {
      std::printf("   log Z in [%.6f, %.6f]", q.log_z_lo(), q.log_z_hi());
    }
    std::printf("\n  %4s  %-8s %20s %9s %10s\n", "rank", "kind", "target id", "score", "log q");
    for (int i = 0; i < q.ids_size(); ++i) {
      const bool top = static_cast<uint32_t>(i) < q.num_top();
      std::printf("  %4d  %-8s %20" PRIu64 " %9.4f %10s\n", i + 1,
                  top ? "top-k" : "sample", q.ids(i), q.scores(i),
                  top ? "-" : absl::StrCat(absl::SixDigits(q.log_q(i))).c_str());
    }
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
    const std::vector<std::vector<uint64_t>>& exclude, size_t per_request, bool to_file,
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
  while (done < n) {
    while (in_flight.size() < 2 && sent < n) {
      const size_t m = std::min(per_request, n - sent);
      auto id = session->Send(queries.subspan(sent * q.cols, m * q.cols),
                              static_cast<uint32_t>(q.cols), p,
                              excl.empty() ? excl : excl.subspan(sent, m));
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
  std::vector<std::vector<uint64_t>> exclude;
  if (a.Has("exclude")) {
    CLI_ASSIGN(e, LoadNpyIds(a.Get("exclude"), NegativeIds::kPadding, "--exclude"));
    if (e.rows != q.rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--exclude has ", e.rows, " rows for ", q.rows, " queries"));
    }
    exclude.resize(e.rows);
    for (size_t i = 0; i < e.rows; ++i) {
      for (size_t j = 0; j < e.cols; ++j) {
        const uint64_t id = e.data[i * e.cols + j];
        if (id != kPaddingId) exclude[i].push_back(id);
      }
    }
  }
  const bool json = a.Has("json");
  const std::string out = a.Get("out");
  CLI_ASSIGN(batch_flag, a.Number<uint32_t>("queries-per-request", 0));
  CLI_CHECK(a.CheckAllUsed());
  const size_t n = q.rows;
  if (n == 0) return absl::InvalidArgumentError("the query file holds no queries");
  size_t max_exclude = 0;
  for (const auto& e : exclude) max_exclude = std::max(max_exclude, e.size());
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
    if (json) {
      PrintJson(r, begin, log_z);
    } else if (out.empty()) {
      PrintTable(r, begin, log_z);
    }
  };
  if (n <= per_request) {
    // One request: one Mine call.
    CLI_ASSIGN(r, c.Mine(collection, q.data, static_cast<uint32_t>(q.cols), p, exclude));
    consume(r, 0);
  } else {
    CLI_CHECK(MineInRequests(c, collection, q, p, exclude, per_request, !out.empty(), consume));
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
  if (!json && out.empty()) {
    if (first_version == last_version) {
      std::printf("\nindex version %" PRIu64 "\n", last_version);
    } else {
      std::printf("\nindex versions %" PRIu64 "..%" PRIu64 " (writes landed between requests)\n",
                  first_version, last_version);
    }
  }
  return absl::OkStatus();
}

absl::Status Info(Client& c, const Args& a) {
  const bool one = a.Has("collection");
  const std::string collection = a.Get("collection");
  CLI_CHECK(a.CheckAllUsed());
  if (one) {
    CLI_ASSIGN(info, c.GetIndexInfo(collection));
    PrintInfo(info.info());
    if (info.info().has_tree()) {
      const v1::TreeInfo& t = info.info().tree();
      std::printf("tree: depth=%u nodes=%" PRIu64 " leaves=%" PRIu64 " leaf size min/mean/max=%" PRIu64
                  "/%.1f/%" PRIu64 " looseness=%.3f rebuilds=%" PRIu64 " (+%" PRIu64
                  " subtrees) visits/query=%.1f\n",
                  t.depth(), t.nodes(), t.leaves(), t.min_leaf(), t.mean_leaf(), t.max_leaf(),
                  t.looseness(), t.rebuilds(), t.subtree_rebuilds(), t.visits_per_query());
    }
    const v1::DriftInfo& d = info.info().drift();
    if (d.active()) {
      std::printf("drift: step=%" PRId64 " kernel=%s residual=%.4f (no correction %.4f) updates=%" PRIu64
                  " rebases=%" PRIu64 " landmarks=%u (epoch %" PRIu64 ")\n",
                  d.model_step(), d.kernel().c_str(), d.heldout_residual(), d.stale_residual(),
                  d.updates(), d.rebases(), d.num_landmarks(), d.landmark_epoch());
    } else {
      std::printf("drift: none applied\n");
    }
    std::printf("limits: max_message_bytes=%" PRIu64 " max_batch=%u max_k=%u\n",
                info.limits().max_message_bytes(), info.limits().max_batch(),
                info.limits().max_k());
    return absl::OkStatus();
  }
  CLI_ASSIGN(all, c.ListCollections());
  if (all.empty()) std::printf("no collections\n");
  for (const auto& i : all) PrintInfo(i);
  return absl::OkStatus();
}

absl::Status Landmarks(Client& c, const Args& a) {
  CLI_ASSIGN(collection, a.Required("collection"));
  const std::string out = a.Get("ids-out");
  const bool json = a.Has("json");
  CLI_CHECK(a.CheckAllUsed());
  CLI_ASSIGN(resp, c.GetLandmarks(collection));
  const std::vector<uint64_t> ids(resp.ids().begin(), resp.ids().end());
  if (!out.empty()) CLI_CHECK(SaveNpy(out, ids.size(), 1, ids));
  if (json) {
    std::printf("{\"landmark_epoch\": %" PRIu64 ", \"num_landmarks\": %zu, \"ids\": [%s]}\n",
                resp.landmark_epoch(), ids.size(), absl::StrJoin(ids, ", ").c_str());
    return absl::OkStatus();
  }
  std::printf("landmark epoch %" PRIu64 ": %zu landmarks\n", resp.landmark_epoch(), ids.size());
  if (!out.empty()) std::printf("wrote their ids to %s\n", out.c_str());
  return absl::OkStatus();
}

absl::Status Drift(Client& c, const Args& a) {
  CLI_ASSIGN(collection, a.Required("collection"));
  if (!a.Has("model-step")) return absl::InvalidArgumentError("--model-step is required");
  CLI_ASSIGN(step, a.Number<int64_t>("model-step", 0));
  CLI_ASSIGN(dim, CollectionDim(c, collection));
  absl::StatusOr<v1::ApplyDriftResponse> resp;
  // ApplyDrift reports no progress: the elapsed time while it runs.
  Progress progress(absl::StrCat("drift update of '", collection, "'"), 0, "");
  std::optional<Ticker> ticker;
  if (a.Has("simulate")) {
    CLI_ASSIGN(seed, a.Number<uint64_t>("seed", 1));
    CLI_CHECK(a.CheckAllUsed());
    CLI_ASSIGN(lm, c.GetLandmarks(collection));
    CLI_ASSIGN(info, c.GetIndexInfo(collection));
    // The drift-bench encoder over rows 0..max id: ids are rows.
    uint64_t max_id = 0;
    for (uint64_t id : lm.ids()) max_id = std::max(max_id, id);
    DriftBench bench({.num_targets = std::max<uint64_t>(max_id + 1, info.info().num_targets()),
                      .num_queries = 0, .dim = static_cast<int>(dim), .seed = seed});
    const std::vector<size_t> rows(lm.ids().begin(), lm.ids().end());
    ticker.emplace(progress);
    resp = c.ApplyDrift(collection, step, lm.landmark_epoch(),
                        bench.EncodeTargets(static_cast<double>(step), rows), dim);
  } else if (a.Has("landmark-embeddings")) {
    CLI_ASSIGN(epoch, a.Number<uint64_t>("epoch", 0));
    if (!a.Has("epoch")) {
      return absl::InvalidArgumentError(
          "--epoch is required with --landmark-embeddings (see `negmine landmarks`)");
    }
    CLI_ASSIGN(g, LoadNpyFloat(a.Get("landmark-embeddings")));
    CLI_CHECK(a.CheckAllUsed());
    ticker.emplace(progress);
    resp = c.ApplyDrift(collection, step, epoch, g.data, g.cols);
  } else if (a.Has("linear-a")) {
    CLI_ASSIGN(m, LoadNpyFloat(a.Get("linear-a")));
    std::vector<float> b;
    if (a.Has("linear-b")) {
      CLI_ASSIGN(loaded, LoadNpyFloat(a.Get("linear-b")));
      b = std::move(loaded.data);
    }
    CLI_CHECK(a.CheckAllUsed());
    ticker.emplace(progress);
    resp = c.ApplyLinearMap(collection, step, m.data, b, m.cols);
  } else {
    return absl::InvalidArgumentError(
        "give one of --landmark-embeddings, --linear-a or --simulate");
  }
  ticker.reset();
  if (!resp.ok()) return resp.status();
  std::printf("drift at step %" PRId64 ": kernel=%s held-out residual %.4f (no correction %.4f) "
              "fit %.3fs apply %.3fs%s; index version %" PRIu64 ", landmark epoch %" PRIu64 "\n",
              step, resp->kernel().c_str(), resp->heldout_residual(), resp->stale_residual(),
              resp->fit_seconds(), resp->apply_seconds(), resp->rebased() ? ", re-based" : "",
              resp->index_version(), resp->landmark_epoch());
  return absl::OkStatus();
}

absl::Status Batches(Client& c, const Args& a) {
  CLI_ASSIGN(qpath, a.Required("queries"));
  CLI_ASSIGN(ppath, a.Required("positives"));
  CLI_ASSIGN(out, a.Required("out"));
  CLI_ASSIGN(batch_size, a.Number<uint32_t>("batch-size", 0));
  CLI_ASSIGN(neighbors, a.Number<uint32_t>("neighbors", 0));
  CLI_ASSIGN(quantile, a.Number<double>("quantile", 0));
  CLI_ASSIGN(seed, a.Number<uint64_t>("seed", 1));
  const bool keep_order = a.Has("keep-batch-order");
  // A job by default: the server's synchronous limit (--max_sync_batch_examples)
  // is not in GetIndexInfo, and a job of any size answers the same batches,
  // with progress. --sync waits on the one call instead.
  const bool sync = a.Has("sync");
  if (sync && a.Has("async")) return absl::InvalidArgumentError("give --sync or --async, not both");
  CLI_CHECK(a.CheckAllUsed());
  CLI_ASSIGN(q, LoadNpyFloat(qpath));
  CLI_ASSIGN(p, LoadNpyFloat(ppath));
  if (q.rows != p.rows || q.cols != p.cols) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--queries is ", q.rows, " x ", q.cols, " but --positives is ", p.rows, " x ", p.cols,
        "; row i of each is one training example"));
  }
  v1::AssignBatchesRequest first;
  first.set_batch_size(batch_size);
  first.set_seed(seed);
  first.mutable_params()->set_neighbors(neighbors);
  first.mutable_params()->set_quantile(quantile);
  first.mutable_params()->set_keep_batch_order(keep_order);
  first.set_async(!sync);
  // A unary call first: retried while the server recovers, where the
  // stream, once past gRPC's retry buffer, would not be.
  CLI_CHECK(c.ListCollections().status());
  absl::StatusOr<v1::AssignBatchesResponse> resp;
  {
    Progress upload("batches: upload", q.rows, "examples sent");
    std::optional<Ticker> ticker;  // a synchronous call then waits for the batches
    resp = c.AssignBatches(first, q.data, p.data, q.cols, [&](size_t sent, size_t total) {
      upload.Set(sent);
      if (sent == total && sync) ticker.emplace(upload);
    });
  }
  if (!resp.ok()) return resp.status();
  v1::AssignBatchesResponse result = *std::move(resp);
  if (!sync) {
    const std::string job = result.job_id();
    Progress progress(absl::StrCat("batches: job ", job), 0, "");
    std::chrono::milliseconds poll(20);
    while (true) {
      CLI_ASSIGN(status, c.GetBatchJob(job));
      progress.SetFraction(status.state() == v1::JOB_STATE_DONE ? 1.0 : status.progress());
      if (status.state() == v1::JOB_STATE_DONE) {
        result = status.result();
        break;
      }
      if (status.state() == v1::JOB_STATE_FAILED) {
        return absl::Status(static_cast<absl::StatusCode>(status.error().code()),
                            absl::StrCat("batch job ", job, ": ", status.error().message()));
      }
      std::this_thread::sleep_for(poll);
      poll = std::min<std::chrono::milliseconds>(poll * 3 / 2, std::chrono::milliseconds(500));
    }
  }
  const size_t num = result.batches_size();
  std::vector<uint64_t> table(num * batch_size, ~uint64_t{0});
  for (size_t b = 0; b < num; ++b) {
    const auto& ids = result.batches(b).example_indices();
    std::copy(ids.begin(), ids.end(), table.begin() + b * batch_size);
  }
  CLI_CHECK(SaveNpy(out, num, batch_size, table));
  std::printf("%zu batches of %u from %" PRIu64 " examples (%" PRIu64 " graph edges, %" PRIu64
              " components) in %.2f s; in-batch similarity %.1f -> %.1f (x%.2f), bandwidth %.0f -> %.0f; "
              "wrote %s\n",
              num, batch_size, result.num_examples(), result.edges(), result.components(),
              result.seconds(), result.in_batch_similarity_before(),
              result.in_batch_similarity_after(),
              result.in_batch_similarity_before() != 0
                  ? result.in_batch_similarity_after() / result.in_batch_similarity_before()
                  : 0.0,
              result.bandwidth_before(), result.bandwidth_after(), out.c_str());
  return absl::OkStatus();
}

// grpc.health.v1.Health/Check through a generic stub: the request is the
// empty HealthCheckRequest (service ""), and SERVING is the response bytes
// 08 01 (field 1, varint 1).
absl::Status Health(Client& c, const Args& a) {
  CLI_ASSIGN(timeout, a.Number<double>("timeout-seconds", 5));
  CLI_ASSIGN(wait, a.Number<double>("wait", 0));
  CLI_CHECK(a.CheckAllUsed());
  if (wait < 0) return absl::InvalidArgumentError("--wait SECONDS must be >= 0");
  if (wait > 0) {
    CLI_CHECK(c.WaitForServing(std::chrono::milliseconds(static_cast<int64_t>(wait * 1000))));
    std::printf("SERVING\n");
    return absl::OkStatus();
  }
  grpc::GenericStub stub(c.channel());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(timeout * 1000)));
  grpc::Slice empty;
  grpc::ByteBuffer request(&empty, 1), response;
  absl::Mutex mu;
  bool done = false;
  grpc::Status status;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                 &response, [&](grpc::Status s) {
                   absl::MutexLock lock(&mu);
                   status = std::move(s);
                   done = true;
                 });
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(&done));
  }
  if (!status.ok()) return FromGrpc(status, "health");
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return absl::InternalError("health: unreadable response");
  std::string bytes;
  for (const grpc::Slice& sl : slices) bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  if (bytes != std::string("\x08\x01", 2)) {
    return absl::UnavailableError("health: the server is not SERVING (starting or draining)");
  }
  std::printf("SERVING\n");
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

absl::Status Run(int argc, char** argv) {
  Args a;
  CLI_CHECK(a.Parse(argc, argv, 1));
  const std::string& cmd = a.command();
  if (a.Has("version")) {
    std::printf("negmine %s\n", kVersion);
    return absl::OkStatus();
  }
  if (cmd.empty() || cmd == "help" || a.Has("help")) {
    const std::string topic = cmd == "help" ? a.topic() : cmd;
    if (topic.empty()) {
      std::fputs(Usage().c_str(), stdout);
      return absl::OkStatus();
    }
    const std::string text = CommandUsage(topic);
    if (text.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown command '", topic, "'; run 'negmine help'"));
    }
    std::fputs(text.c_str(), stdout);
    return absl::OkStatus();
  }
  if (cmd == "create") {
    CLI_CHECK(a.Rename("landmarks", "num-landmarks", "the number of landmarks per set"));
  } else if (cmd == "landmarks") {
    CLI_CHECK(a.Rename("out", "ids-out", "it writes the landmark ids"));
  } else if (cmd == "drift") {
    CLI_CHECK(a.Rename("landmarks", "landmark-embeddings",
                       "it reads the landmarks' re-encoded embeddings"));
  }
  if (cmd == "generate") return Generate(a);
  const char* env = std::getenv("NEGMINE_SERVER");
  const std::string server = a.Get("server", env ? env : "127.0.0.1:50051");
  ClientOptions options;
  options.timeout = std::chrono::seconds(600);
  // TLS and the bearer token.
  for (auto [flag, field] : {std::pair{"tls-ca", &options.tls_root_certs},
                             std::pair{"tls-cert", &options.tls_cert_chain},
                             std::pair{"tls-key", &options.tls_private_key},
                             std::pair{"token-file", &options.auth_token}}) {
    if (!a.Has(flag)) continue;
    std::ifstream in(a.Get(flag), std::ios::binary);
    if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", a.Get(flag), ": cannot read it"));
    field->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  options.auth_token = std::string(absl::StripAsciiWhitespace(options.auth_token));
  if (!a.Has("token-file")) {
    if (const char* t = std::getenv("NEGMINE_TOKEN")) options.auth_token = t;
  }
  auto client = Client::Connect(server, options);
  if (cmd == "health") return Health(*client, a);
  if (cmd == "create") return Create(*client, a);
  if (cmd == "list") {
    CLI_CHECK(a.CheckAllUsed());
    return Info(*client, a);
  }
  if (cmd == "drop") {
    CLI_ASSIGN(collection, a.Required("collection"));
    CLI_CHECK(a.CheckAllUsed());
    CLI_CHECK(client->DropCollection(collection));
    std::printf("dropped '%s'\n", collection.c_str());
    return absl::OkStatus();
  }
  if (cmd == "upsert") return Upsert(*client, a);
  if (cmd == "delete") return Delete(*client, a);
  if (cmd == "mine") return Mine(*client, a);
  if (cmd == "info") return Info(*client, a);
  if (cmd == "landmarks") return Landmarks(*client, a);
  if (cmd == "drift") return Drift(*client, a);
  if (cmd == "batches") return Batches(*client, a);
  if (cmd == "snapshot") {
    CLI_CHECK(a.CheckAllUsed());
    CLI_ASSIGN(resp, client->CreateSnapshot());
    std::printf("wrote %s (%" PRIu64 " bytes)\n", resp.path().c_str(), resp.bytes());
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown command '", cmd, "'; run 'negmine help'"));
}

}  // namespace
}  // namespace negmine::client

int main(int argc, char** argv) {
  absl::Status s = negmine::client::Run(argc, argv);
  if (!s.ok()) {
    std::fprintf(stderr, "negmine: %s: %s\n",
                 absl::StatusCodeToString(s.code()).c_str(),
                 std::string(s.message()).c_str());
    return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
