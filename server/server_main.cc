// negmine-server: the negmine index server.
//
//   negmine-server --listen=127.0.0.1:50051 --data_dir=./negmine-data
//
// Lifecycle: the gRPC port opens first and grpc.health.v1 answers
// NOT_SERVING (RPCs answer UNAVAILABLE) until the data dir is locked and the
// embedded default collection is loaded; then SERVING. SIGTERM or SIGINT
// drains: health turns NOT_SERVING, new calls are refused, in-flight calls
// get --shutdown_grace_seconds to finish. A second signal exits at once.
#include <malloc.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include <grpc/grpc.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/support/server_interceptor.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/index.h"
#include "core/persist/wal.h"
#include "core/persist/wal_entry.h"
#include "core/status.h"
#include "core/store/drift_bench.h"
#include "server/log.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/durability.h"
#include "server/service.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "gRPC listen address. Localhost by default: negmine is a sidecar. "
          "Port 0 picks a free port (see --port_file).");
ABSL_FLAG(std::string, data_dir, "./negmine-data",
          "Directory for the server's data; created if missing and locked "
          "against a second server.");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9464",
          "Prometheus /metrics address; empty disables it.");
ABSL_FLAG(int, worker_threads, 0,
          "Threads that run request work; 0 = one per core.");
ABSL_FLAG(uint64_t, coalesce_max_queries, 4096,
          "Micro-batching: concurrent top-k Mine/MineStream requests on one CUDA "
          "collection are merged into one search of at most this many queries; 0: off.");
ABSL_FLAG(int64_t, coalesce_max_delay_us, 200,
          "Micro-batching latency budget: how long a batch waits for more requests "
          "(microseconds; a batch also waits while the previous one runs).");
ABSL_FLAG(bool, allow_cpu_fallback, false,
          "Serve collections created with backend cuda on the CPU (logged) when CUDA is "
          "not built or no GPU is visible, instead of refusing them (also at recovery).");
ABSL_FLAG(bool, coalesce_cpu, false,
          "Micro-batch CPU collections too (a merged CPU search runs on one thread).");
ABSL_FLAG(uint64_t, max_message_bytes, 64 << 20,
          "Largest gRPC message accepted or sent, in bytes.");
ABSL_FLAG(uint32_t, max_batch, 65536, "Most queries in one MineRequest.");
ABSL_FLAG(uint32_t, max_k, 4096, "Largest k of a MineRequest.");
ABSL_FLAG(uint64_t, max_queued_requests, 1024,
          "Requests waiting for a worker beyond which new ones get RESOURCE_EXHAUSTED.");
ABSL_FLAG(uint64_t, bulk_request_bytes, 1 << 20,
          "Mine/MineStream requests larger than this (bytes) run on a pool of "
          "worker_threads - 1 threads, so small requests never wait behind them.");
ABSL_FLAG(uint64_t, max_mine_memory_bytes, uint64_t{2} << 30,
          "Memory the mining requests in flight may hold together (estimated from rows x dim "
          "and rows x k); beyond it RESOURCE_EXHAUSTED with a retry hint.");
ABSL_FLAG(int, work_unit_queries, 256,
          "Queries per work unit of a CPU search (top-k and sampling): a deadline stops a "
          "batch within one unit. 0: whole batches.");
ABSL_FLAG(uint64_t, max_batch_examples, 2000000,
          "Most training examples in one AssignBatches call.");
ABSL_FLAG(uint64_t, max_sync_batch_examples, 100000,
          "Most examples in a synchronous AssignBatches call; more need async.");
ABSL_FLAG(int, max_batch_jobs, 2, "AssignBatches jobs running at once.");
ABSL_FLAG(int, batch_job_threads, 2, "Threads per AssignBatches job.");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM server certificate (chain): serve gRPC over TLS (with --tls_key)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: require client certificates signed by it (mTLS)");
ABSL_FLAG(std::string, auth_token_file, "",
          "A file holding a bearer token; every negmine.v1 call must then send "
          "'authorization: Bearer <token>' (the health service stays open)");
ABSL_FLAG(std::string, reflection, "auto",
          "gRPC server reflection: auto (needs the bearer token when --auth_token_file is "
          "set, open otherwise), on (open, also with a token), off. A refused reflection "
          "call ends UNAUTHENTICATED; off: UNIMPLEMENTED.");
ABSL_FLAG(std::string, wal_sync, "always",
          "always: every change is fsynced before it is applied and acknowledged (one "
          "fsync per change); never: the OS writes the log back (survives a server crash, "
          "not a machine crash)");
ABSL_FLAG(int, wal_group_commit_ms, 0,
          "Ignored (a warning when set): each change is fsynced before it is applied, so "
          "changes do not share an fsync.");
ABSL_FLAG(double, snapshot_interval_seconds, 3600,
          "Take a snapshot this often when the log is not empty (0: only on request).");
ABSL_FLAG(uint64_t, snapshot_wal_bytes, uint64_t{1} << 30,
          "Take a snapshot when the log reaches this size (0: no size trigger).");
ABSL_FLAG(double, stats_interval_seconds, 15,
          "How often the tree and drift metrics are refreshed (O(N) each); 0: never.");
ABSL_FLAG(uint32_t, default_dim, 0,
          "If > 0, create the collection \"default\" with this dim at start.");
ABSL_FLAG(std::string, default_metric, "inner_product",
          "Metric of the default collection: cosine | inner_product.");
ABSL_FLAG(std::string, default_index, "tree",
          "Index of the default collection: tree | exact.");
ABSL_FLAG(uint64_t, generate_targets, 0,
          "Fill the default collection with this many drift-bench targets "
          "(ids 0..N-1, step 0) at start. Needs --default_dim.");
ABSL_FLAG(uint64_t, generate_seed, 1, "Seed of the drift-bench generator.");
ABSL_FLAG(std::string, port_file, "",
          "If set, write the bound gRPC port here once SERVING.");
ABSL_FLAG(int, shutdown_grace_seconds, 10,
          "On SIGTERM, how long in-flight calls may take to finish.");
ABSL_FLAG(std::string, log_level, "info", "debug | info | warning | error");

namespace negmine::server {
namespace {

// Server reflection (grpc.reflection.*) is a plugin that the gRPC library
// registers by itself (at static initialization, whenever it is linked),
// outside the service's token check. This interceptor, installed with
// --reflection=off or with a token under --reflection=auto, ends its calls
// before they run: with a token, unless they carry it (UNAUTHENTICATED,
// with the message of the service's own token check); off, always
// (UNIMPLEMENTED). ServerContext::TryCancel would end them CANCELLED: the
// status is set by cancelling the core call with it, which on the server
// sends it as the call's trailing status (the handler then sees a
// cancelled call, and its own status is not sent).
class ReflectionGuard final : public grpc::experimental::Interceptor {
 public:
  // `token` empty: reflection is off.
  ReflectionGuard(grpc::experimental::ServerRpcInfo* info, const std::string& token)
      : info_(info), token_(token) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::POST_RECV_INITIAL_METADATA) &&
        absl::StartsWith(info_->method(), "/grpc.reflection.")) {
      const absl::Status refused =
          token_.empty()
              ? absl::UnimplementedError("server reflection is off on this server (--reflection)")
              : CheckBearerToken(*methods->GetRecvInitialMetadata(), token_);
      if (!refused.ok()) {
        const std::string message(refused.message());
        grpc_call_cancel_with_status(info_->server_context()->c_call(),
                                     static_cast<grpc_status_code>(refused.code()),
                                     message.c_str(), nullptr);
      }
    }
    methods->Proceed();
  }

 private:
  grpc::experimental::ServerRpcInfo* const info_;
  const std::string& token_;
};

class ReflectionGuardFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit ReflectionGuardFactory(std::string token) : token_(std::move(token)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new ReflectionGuard(info, token_);
  }

 private:
  const std::string token_;
};

// Holds an exclusive flock on <data_dir>/LOCK for the life of the process.
absl::Status LockDataDir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--data_dir=", dir, ": cannot create it: ", ec.message()));
  }
  const std::string path = dir + "/LOCK";
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("--data_dir=", dir, ": cannot open ", path));
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    close(fd);
    return absl::FailedPreconditionError(absl::StrCat(
        "--data_dir=", dir, " is locked by another negmine-server"));
  }
  return absl::OkStatus();  // the fd stays open: the lock lives until exit
}

absl::Status LoadDefaultCollection(NegativeMinerService& service) {
  const uint32_t dim = absl::GetFlag(FLAGS_default_dim);
  const uint64_t n = absl::GetFlag(FLAGS_generate_targets);
  if (dim == 0) {
    if (n > 0) {
      return absl::InvalidArgumentError(
          "--generate_targets needs --default_dim > 0");
    }
    return absl::OkStatus();
  }
  IndexOptions options{.dim = static_cast<int>(dim), .backend = Backend::kAuto,
                       .kind = IndexKind::kTree, .initial_capacity = n};
  const std::string index = absl::GetFlag(FLAGS_default_index);
  if (index == "exact") {
    options.kind = IndexKind::kExact;
  } else if (index != "tree") {
    return absl::InvalidArgumentError(
        absl::StrCat("--default_index=", index, ": use tree or exact"));
  }
  const std::string metric = absl::GetFlag(FLAGS_default_metric);
  if (metric == "cosine") {
    options.metric = Metric::kCosine;
  } else if (metric != "inner_product") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--default_metric=", metric, ": use cosine or inner_product"));
  }
  if (service.Find("default").ok()) return absl::OkStatus();  // recovered
  RETURN_IF_ERROR(service.Commit({.op = WalOp::kCreateCollection,
                                  .collection = "default",
                                  .options = options})
                      .status());
  if (n == 0) return absl::OkStatus();

  const auto start = std::chrono::steady_clock::now();
  DriftBench bench({.num_targets = n, .num_queries = 0, .dim = static_cast<int>(dim),
                    .seed = absl::GetFlag(FLAGS_generate_seed)});
  const std::vector<float> targets = bench.Targets(0);
  // In chunks, so that no log record is huge (as a client's upsert stream).
  constexpr uint64_t kChunk = 65536;
  ProgressLog progress("loading the generated default collection");
  for (uint64_t begin = 0; begin < n; begin += kChunk) {
    progress.Update(static_cast<double>(begin) / n,
                    {{"targets", absl::StrCat(begin, "/", n)}});
    const uint64_t end = std::min(n, begin + kChunk);
    WalEntry upsert{.op = WalOp::kUpsert, .collection = "default"};
    for (uint64_t i = begin; i < end; ++i) upsert.ids.push_back(i);
    upsert.vectors.assign(targets.begin() + begin * dim, targets.begin() + end * dim);
    RETURN_IF_ERROR(service.Commit(upsert).status());
  }
  Log(LogLevel::kInfo, "generated the default collection",
      {{"targets", std::to_string(n)},
       {"dim", std::to_string(dim)},
       {"seed", std::to_string(absl::GetFlag(FLAGS_generate_seed))},
       {"seconds", std::to_string(std::chrono::duration<double>(
                                      std::chrono::steady_clock::now() - start)
                                      .count())}});
  return absl::OkStatus();
}

absl::StatusOr<WalWriter::Options> WalOptions() {
  WalWriter::Options options;
  const std::string sync = absl::GetFlag(FLAGS_wal_sync);
  if (sync == "never") {
    options.sync = WalWriter::SyncPolicy::kNever;
  } else if (sync != "always") {
    return absl::InvalidArgumentError(absl::StrCat("--wal_sync=", sync, ": use always or never"));
  }
  // Each change is fsynced before it is applied, under the commit order, so
  // no other change can join its fsync: a window would only delay it.
  if (absl::GetFlag(FLAGS_wal_group_commit_ms) != 0) {
    Log(LogLevel::kWarning, "--wal_group_commit_ms is ignored: changes do not share fsyncs",
        {{"value", absl::StrCat(absl::GetFlag(FLAGS_wal_group_commit_ms))}});
  }
  return options;
}

absl::StatusOr<std::string> ReadSecretFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, ": cannot read it"));
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (s.empty()) return absl::InvalidArgumentError(absl::StrCat("--", flag, "=", path, " is empty"));
  return s;
}

// TLS (and mTLS) from the flags, or plaintext.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials() {
  const std::string cert = absl::GetFlag(FLAGS_tls_cert), key = absl::GetFlag(FLAGS_tls_key),
                    ca = absl::GetFlag(FLAGS_tls_client_ca);
  if (cert.empty() && key.empty()) {
    if (!ca.empty()) return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
    return grpc::InsecureServerCredentials();
  }
  if (cert.empty() || key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key go together");
  }
  grpc::SslServerCredentialsOptions options(
      ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                 : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  ASSIGN_OR_RETURN(pair.cert_chain, ReadSecretFile("tls_cert", cert));
  ASSIGN_OR_RETURN(pair.private_key, ReadSecretFile("tls_key", key));
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!ca.empty()) {
    ASSIGN_OR_RETURN(options.pem_root_certs, ReadSecretFile("tls_client_ca", ca));
  }
  return grpc::SslServerCredentials(options);
}

int Run() {
  LogLevel level;
  if (!ParseLogLevel(absl::GetFlag(FLAGS_log_level), &level)) {
    std::fprintf(stderr, "--log_level=%s: use debug, info, warning or error\n",
                 absl::GetFlag(FLAGS_log_level).c_str());
    return 2;
  }
  SetLogLevel(level);

  // Signals are taken by one thread with sigwait; block them everywhere
  // before any other thread starts (threads inherit the mask).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  const std::string data_dir = absl::GetFlag(FLAGS_data_dir);
  if (absl::Status s = LockDataDir(data_dir); !s.ok()) {
    Log(LogLevel::kError, "cannot use the data dir", {{"error", s.ToString()}});
    return 1;
  }

  Metrics metrics;
  std::unique_ptr<MetricsHttpServer> metrics_http;
  const std::string metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  if (!metrics_listen.empty()) {
    absl::StatusOr<std::unique_ptr<MetricsHttpServer>> http =
        MetricsHttpServer::Start(metrics_listen, {metrics.registry(), metrics.process()});
    if (!http.ok()) {
      Log(LogLevel::kError, "cannot serve metrics",
          {{"address", metrics_listen}, {"error", http.status().ToString()}});
      return 1;
    }
    metrics_http = *std::move(http);
  }

  int threads = absl::GetFlag(FLAGS_worker_threads);
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = ServerCredentials();
  std::string token;
  if (credentials.ok() && !absl::GetFlag(FLAGS_auth_token_file).empty()) {
    absl::StatusOr<std::string> t =
        ReadSecretFile("auth_token_file", absl::GetFlag(FLAGS_auth_token_file));
    if (t.ok()) token = std::string(absl::StripAsciiWhitespace(*t));
    if (!t.ok() || token.empty()) credentials = t.ok() ? absl::InvalidArgumentError(
        "--auth_token_file holds only whitespace") : t.status();
  }
  if (!credentials.ok()) {
    Log(LogLevel::kError, "bad security flags", {{"error", credentials.status().ToString()}});
    return 2;
  }
  const ServiceOptions options{
      .max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes),
      .max_batch = absl::GetFlag(FLAGS_max_batch),
      .max_k = absl::GetFlag(FLAGS_max_k),
      .worker_threads = threads,
      .max_queued_requests = absl::GetFlag(FLAGS_max_queued_requests),
      .bulk_request_bytes = absl::GetFlag(FLAGS_bulk_request_bytes),
      .max_mine_memory_bytes = absl::GetFlag(FLAGS_max_mine_memory_bytes),
      .work_unit_queries = absl::GetFlag(FLAGS_work_unit_queries),
      .max_batch_examples = absl::GetFlag(FLAGS_max_batch_examples),
      .max_sync_batch_examples = absl::GetFlag(FLAGS_max_sync_batch_examples),
      .max_batch_jobs = absl::GetFlag(FLAGS_max_batch_jobs),
      .batch_job_threads = absl::GetFlag(FLAGS_batch_job_threads),
      .auth_token = token,
      .stats_interval_seconds = absl::GetFlag(FLAGS_stats_interval_seconds),
      .snapshot_interval_seconds = absl::GetFlag(FLAGS_snapshot_interval_seconds),
      .snapshot_wal_bytes = absl::GetFlag(FLAGS_snapshot_wal_bytes),
      .coalesce = {.max_queries = absl::GetFlag(FLAGS_coalesce_max_queries),
                   .max_delay = absl::Microseconds(
                       std::max<int64_t>(0, absl::GetFlag(FLAGS_coalesce_max_delay_us)))},
      .coalesce_cpu = absl::GetFlag(FLAGS_coalesce_cpu),
      .allow_cpu_fallback = absl::GetFlag(FLAGS_allow_cpu_fallback)};
  NegativeMinerService service(options, &metrics);

  grpc::EnableDefaultHealthCheckService(true);
  const std::string reflection = absl::GetFlag(FLAGS_reflection);
  if (reflection != "auto" && reflection != "on" && reflection != "off") {
    Log(LogLevel::kError, "bad --reflection", {{"value", reflection}, {"want", "auto|on|off"}});
    return 2;
  }
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  if (reflection == "on" && !token.empty()) {
    Log(LogLevel::kWarning, "server reflection answers without the bearer token",
        {{"flag", "--reflection=on"}});
  }
  grpc::ServerBuilder builder;
  const std::string listen = absl::GetFlag(FLAGS_listen);
  int port = 0;
  builder.AddListeningPort(listen, *credentials, &port);
  const int max_bytes = static_cast<int>(
      std::min<uint64_t>(options.max_message_bytes, INT32_MAX));
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  builder.RegisterService(&service);
  // The reflection service sits outside NegativeMinerService's checks.
  if (reflection == "off" || (reflection == "auto" && !token.empty())) {
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> guards;
    guards.push_back(
        std::make_unique<ReflectionGuardFactory>(reflection == "off" ? std::string() : token));
    builder.experimental().SetInterceptorCreators(std::move(guards));
  }
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    Log(LogLevel::kError, "cannot listen", {{"address", listen}});
    return 1;
  }
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(false);

  // Until here the health service says NOT_SERVING: recovery first.
  absl::StatusOr<WalWriter::Options> wal_options = WalOptions();
  absl::Status recovered = wal_options.ok() ? Recover(service, data_dir, *wal_options)
                                            : wal_options.status();
  if (!recovered.ok()) {
    Log(LogLevel::kError, "cannot recover the data dir", {{"error", recovered.ToString()}});
    server->Shutdown();
    return 1;
  }
  if (absl::Status s = LoadDefaultCollection(service); !s.ok()) {
    Log(LogLevel::kError, "cannot load the default collection",
        {{"error", s.ToString()}});
    server->Shutdown();
    return 1;
  }
  service.SetReady(true);
  // Reads go on while the log refuses changes (a full disk): the server as a
  // whole stays SERVING, and this service name says whether writes work.
  static constexpr char kWritesHealth[] = "negmine.v1.NegativeMiner/writes";
  health->SetServingStatus(kWritesHealth, true);
  service.OnWritableChange(
      [health](bool writable) { health->SetServingStatus(kWritesHealth, writable); });
  health->SetServingStatus(true);

  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty()) {
    // Written then renamed, so a reader never sees a partial port.
    const std::string tmp = port_file + ".tmp";
    std::ofstream(tmp) << port << "\n";
    std::filesystem::rename(tmp, port_file);
  }
  Log(LogLevel::kInfo, "serving",
      {{"address", listen},
       {"port", std::to_string(port)},
       {"metrics", metrics_listen.empty() ? "off" : metrics_listen},
       {"data_dir", data_dir},
       {"worker_threads", std::to_string(threads)}});

  std::thread signal_thread([&] {
    int sig = 0;
    sigwait(&signals, &sig);
    Log(LogLevel::kInfo, "draining", {{"signal", strsignal(sig)}});
    health->SetServingStatus(false);
    std::thread([&] {
      int again = 0;
      sigwait(&signals, &again);
      Log(LogLevel::kWarning, "second signal: exiting now");
      std::_Exit(1);
    }).detach();
    const auto grace =
        std::chrono::seconds(absl::GetFlag(FLAGS_shutdown_grace_seconds));
    server->Shutdown(std::chrono::system_clock::now() + grace);
  });
  server->Wait();
  service.OnWritableChange(nullptr);
  signal_thread.join();
  Log(LogLevel::kInfo, "stopped");
  return 0;
}

}  // namespace
}  // namespace negmine::server

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "negmine-server: the negmine hard-negative mining index server.\n"
      "  negmine-server --listen=127.0.0.1:50051 --data_dir=./negmine-data");
  absl::ParseCommandLine(argc, argv);
  // Every batch allocates and frees its results (megabytes at batch 4096).
  // glibc would map large blocks fresh and trim the heap after each free,
  // so the next batch faults the pages in again; on a VM that cost ~10 ms
  // per 4096-query batch (bench/cuda_bench.cc). Keep the memory instead.
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  return negmine::server::Run();
}
