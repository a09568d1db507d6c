// negmine-cuda-bench: the GPU backend's figures, with the device's own
// ceilings measured in the same run.
//
//   ceilings  device-to-device copy bandwidth (bytes read + written) and a
//             cuBLAS float16 GEMM of 8192^3 (float32 accumulation)
//   scan      brute force over N x d float16 targets (default 20M x 128):
//             bandwidth at batch 1 (target bytes / time) and the scoring
//             GEMM's TFLOP/s at batch >= 1024, each as a share of the
//             ceilings, plus the whole top-k's queries/s
//   tree      drift-bench data (default 1M x 128): tree beam top-k against
//             device brute force at batch 4096, recall@k against the exact
//             float32 result, and the speed ratio
//   memory    device bytes per target
//
// Output: a Markdown report on stdout (and in --out, when given).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/cuda/device_mirror.h"
#include "core/index.h"
#include "core/random.h"
#include "core/store/drift_bench.h"
#include "core/tree/tree.h"

namespace negmine {
namespace {

struct Flags {
  size_t scan_n = 20'000'000;
  size_t tree_n = 1'000'000;
  int dim = 128;
  int k = 64;
  int reps = 10;
  bool fused_scan = true;  // the scan section's fused rows
  std::string out;
};

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string report;
template <typename... Args>
void Say(const absl::FormatSpec<Args...>& f, const Args&... args) {
  const std::string line = absl::StrFormat(f, args...);
  std::fputs(line.c_str(), stdout);
  std::fflush(stdout);
  report += line;
}

#define CHECK_CUDA(x)                                                              \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e));                 \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

// Device-to-device copy, bytes read + written per second.
double CopyBandwidth() {
  const size_t bytes = size_t{4} << 30;
  void *a, *b;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  CHECK_CUDA(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
  CHECK_CUDA(cudaDeviceSynchronize());
  const double t0 = Now();
  const int reps = 10;
  for (int i = 0; i < reps; ++i) CHECK_CUDA(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
  CHECK_CUDA(cudaDeviceSynchronize());
  const double t = (Now() - t0) / reps;
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / t;
}

// FLOP/s of a float16 8192^3 GEMM with float32 accumulation.
double GemmPeak() {
  const int n = 8192;
  void *a, *b, *c;
  CHECK_CUDA(cudaMalloc(&a, size_t{n} * n * 2));
  CHECK_CUDA(cudaMalloc(&b, size_t{n} * n * 2));
  CHECK_CUDA(cudaMalloc(&c, size_t{n} * n * 4));
  CHECK_CUDA(cudaMemset(a, 0x3c, size_t{n} * n * 2));  // small nonzero halves
  CHECK_CUDA(cudaMemset(b, 0x3c, size_t{n} * n * 2));
  cublasHandle_t h;
  cublasCreate(&h);
  const float alpha = 1, beta = 0;
  auto run = [&] {
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16F, n, b, CUDA_R_16F,
                 n, &beta, c, CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };
  for (int i = 0; i < 3; ++i) run();
  CHECK_CUDA(cudaDeviceSynchronize());
  const double t0 = Now();
  const int reps = 10;
  for (int i = 0; i < reps; ++i) run();
  CHECK_CUDA(cudaDeviceSynchronize());
  const double t = (Now() - t0) / reps;
  cublasDestroy(h);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * n * n * double(n) / t;
}

// n x dim uniform [-1, 1) floats, in parallel, deterministic.
std::vector<float> Uniform(size_t n, int dim, uint64_t seed) {
  std::vector<float> v(n * dim);
  const unsigned threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      const size_t lo = v.size() * t / threads, hi = v.size() * (t + 1) / threads;
      uint64_t x = Mix64(seed + t);
      for (size_t i = lo; i < hi; ++i) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        v[i] = static_cast<float>((x >> 40) * 0x1p-24 * 2.0 - 1.0);
      }
    });
  }
  for (auto& th : pool) th.join();
  return v;
}

void ScanSection(const Flags& f, double copy_bw, double peak) {
  Say("\n## Brute-force scan: N = %zu, d = %d, float16, k = %d\n\n", f.scan_n, f.dim, f.k);
  const double t0 = Now();
  std::vector<float> data = Uniform(f.scan_n, f.dim, 1);
  std::vector<uint8_t> live(f.scan_n, 1);
  absl::StatusOr<std::unique_ptr<DeviceMirror>> m = DeviceMirror::Create(f.dim, DeviceDtype::kFloat16);
  Check(m.status(), "create");
  DeviceMirror& dev = **m;
  Check(dev.SetAll({.data = data.data(), .dim = f.dim}, f.scan_n, live.data(), nullptr), "upload");
  const double upload = Now() - t0;
  data.clear();
  data.shrink_to_fit();
  Say("Generated and uploaded in %.1f s. Device memory %.1f GB = %.1f bytes/target "
      "(stride %d halves, a live byte and an 8-byte id per target, plus scratch).\n\n",
      upload, dev.MemoryBytes() / 1e9, double(dev.MemoryBytes()) / f.scan_n, (f.dim + 7) / 8 * 8);
  Say("The fused rows score with the tensor-core kernel whose epilogue keeps only the "
      "scores above each query's bound (DeviceMirror::set_fused_scan; batches >= 64); "
      "its GEMM ms is the whole fused kernel, epilogue included.\n\n");
  Say("| scan | batch | top-%d q/s | ms/batch | GEMM ms | GEMM TFLOP/s | %% of GEMM peak | "
      "target bytes/s | %% of copy bandwidth |\n|---|---|---|---|---|---|---|---|---|\n", f.k);
  const double target_bytes = double(f.scan_n) * ((f.dim + 7) / 8 * 8) * 2;
  std::vector<std::string> profiles;
  const std::pair<bool, size_t> runs[] = {{false, 1},    {false, 16},  {false, 1024},
                                          {false, 4096}, {true, 1024}, {true, 4096}};
  for (const auto& [fused, batch] : runs) {
    if (fused && !f.fused_scan) continue;
    dev.set_fused_scan(fused);
    std::vector<float> q = Uniform(batch, f.dim, 7 + batch);
    DeviceMirror::ScanParams p;
    p.k = f.k;
    std::vector<DeviceHit> hits;
    Check(dev.Scan(q, batch, p, &hits, nullptr), "warm-up");
    const int reps = batch >= 1024 ? 3 : f.reps;
    double t = 0, gemm = 0;
    for (int r = 0; r < reps; ++r) {
      dev.set_profiling(false);
      const double s = Now();
      Check(dev.Scan(q, batch, p, &hits, nullptr), "scan");
      t += Now() - s;
      dev.set_profiling(true);
      Check(dev.Scan(q, batch, p, &hits, nullptr), "scan (profiled)");
      gemm += dev.LastGemmSeconds();
    }
    dev.set_profiling(false);
    t /= reps;
    gemm /= reps;
    const double flops = 2.0 * f.scan_n * double(batch) * ((f.dim + 7) / 8 * 8);
    profiles.push_back(absl::StrCat("- ", fused ? "fused" : "cuBLAS + select", ", batch ", batch,
                                    ": ", dev.LastProfile(),
                                    fused ? absl::StrCat(" (redone unfused: ", dev.LastFusedRedo(),
                                                         " queries)")
                                          : "",
                                    "\n"));
    Say("| %s | %zu | %.0f | %.2f | %.2f | %.1f | %.0f%% | %.2f TB/s | %.0f%% |\n",
        fused ? "fused" : "cuBLAS + select", batch, batch / t,
        t * 1e3, gemm * 1e3, flops / gemm / 1e12, 100 * flops / gemm / peak,
        target_bytes / t / 1e12, 100 * target_bytes / t / copy_bw);
  }
  Say("\nPhases of one profiled call (the stream synchronized after each):\n\n");
  for (const std::string& p : profiles) Say("%s", p);
}

void TreeSection(const Flags& f) {
  Say("\n## Tree beam vs device brute force: drift-bench N = %zu, d = %d, k = %d, batch 4096\n\n",
      f.tree_n, f.dim, f.k);
  DriftBench bench({.num_targets = f.tree_n, .num_queries = 4096, .dim = f.dim, .seed = 1});
  double t0 = Now();
  std::vector<float> targets = bench.Targets(0);
  std::vector<float> queries = bench.Queries(0);
  std::vector<uint64_t> ids(f.tree_n);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = i;
  Say("Data generated in %.1f s.\n\n", Now() - t0);
  const size_t nq = queries.size() / f.dim;

  for (DeviceDtype dtype : {DeviceDtype::kFloat32, DeviceDtype::kFloat16}) {
    IndexOptions o{.dim = f.dim, .backend = Backend::kCuda, .device_dtype = dtype,
                   .kind = IndexKind::kTree};
    o.tree.background_rebuild = false;
    absl::StatusOr<std::unique_ptr<Index>> index = CreateIndex(o);
    Check(index.status(), "create");
    t0 = Now();
    Check((*index)->Upsert(ids, targets, 0), "upsert");
    const double build = Now() - t0;
    auto run = [&](const SearchParams& p, double* qps) {
      absl::StatusOr<SearchResult> r = (*index)->Search(queries, {}, p);  // warm-up + upload
      Check(r.status(), "search");
      const int reps = 3;
      const double s = Now();
      for (int i = 0; i < reps; ++i) r = (*index)->Search(queries, {}, p);
      *qps = nq * reps / (Now() - s);
      return *std::move(r);
    };
    double brute_qps = 0;
    const SearchResult truth = run({.k = f.k}, &brute_qps);
    const IndexStats stats = (*index)->Stats();
    Say("### %s: host insert + tree build %.1f s; device memory %.1f bytes/target "
        "(vectors, leaves, scratch)\n\n",
        DeviceDtypeName(dtype), build, double(stats.device_memory_bytes) / f.tree_n);
    if (std::optional<TreeSummary> t = (*index)->TreeInfo()) {
      Say("Tree: %zu leaves, leaf size min %zu / mean %.1f / max %zu, depth %d.\n\n",
          t->num_leaves, t->min_leaf, t->mean_leaf, t->max_leaf, t->depth);
    }
    Say("| method | recall@%d | q/s | x brute force |\n|---|---|---|---|\n", f.k);
    Say("| device brute force (exact) | 1.000 | %.0f | 1.0 |\n", brute_qps);
    for (int width : {32, 64, 128, 192, 256, 384}) {
      double qps = 0;
      const SearchResult r = run({.k = f.k, .approximate = true, .beam_width = width}, &qps);
      double hits = 0;
      for (size_t i = 0; i < nq; ++i) {
        std::set<uint64_t> t(truth.queries[i].ids.begin(), truth.queries[i].ids.end());
        for (uint64_t id : r.queries[i].ids) hits += t.count(id);
      }
      Say("| beam %d leaves | %.4f | %.0f | %.1f |\n", width, hits / (double(f.k) * nq), qps,
          qps / brute_qps);
    }
    // Sampling: the tree's proposal (DeviceMirror::Propose) against exact
    // Gumbel-top-k over the scan, k samples without replacement.
    Say("\n| sampler (k = %d, without replacement) | tau | q/s | x exact |\n|---|---|---|---|\n",
        f.k);
    for (float tau : {0.05f, 0.1f}) {
      double exact_qps = 0, proposal_qps = 0;
      run({.mode = MineMode::kSample, .sampler = Sampler::kExact, .k = f.k, .temperature = tau},
          &exact_qps);
      run({.mode = MineMode::kSample, .k = f.k, .temperature = tau}, &proposal_qps);
      Say("| exact (Gumbel-top-k, scan) | %.2f | %.0f | 1.0 |\n", tau, exact_qps);
      Say("| proposal (tree leaves) | %.2f | %.0f | %.1f |\n", tau, proposal_qps,
          proposal_qps / exact_qps);
    }
    // A trainer's loop: one small write, then a query batch. The write
    // reaches the device by changed rows and changed runs of the leaf pool.
    const SearchParams beam{.k = f.k, .approximate = true, .beam_width = 192};
    const std::vector<float> one(queries.begin(), queries.begin() + f.dim);
    double read_only = 0, with_write = 0;
    const int reps = 20;
    for (int i = 0; i < reps; ++i) {
      double s = Now();
      Check((*index)->Search(one, {}, beam).status(), "search");
      read_only += Now() - s;
      s = Now();
      Check((*index)->Upsert({ids[i]}, absl::MakeConstSpan(targets).subspan(
                                           ((i + 1) % f.tree_n) * f.dim, f.dim), 1),
            "upsert");
      Check((*index)->Search(one, {}, beam).status(), "search");
      with_write += Now() - s;
    }
    Say("\nOne query (beam 192) after one upsert: %.2f ms; without the write %.2f ms.\n\n",
        1e3 * with_write / reps, 1e3 * read_only / reps);
  }
}

}  // namespace
}  // namespace negmine

int main(int argc, char** argv) {
  using namespace negmine;
  Flags f;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* name) -> const char* {
      const size_t len = std::strlen(name);
      return a.compare(0, len, name) == 0 ? a.c_str() + len : nullptr;
    };
    if (const char* v = value("--scan_n=")) f.scan_n = std::stoull(v);
    else if (const char* v = value("--tree_n=")) f.tree_n = std::stoull(v);
    else if (const char* v = value("--dim=")) f.dim = std::stoi(v);
    else if (const char* v = value("--k=")) f.k = std::stoi(v);
    else if (const char* v = value("--reps=")) f.reps = std::stoi(v);
    else if (const char* v = value("--out=")) f.out = v;
    else if (const char* v = value("--fused_scan=")) f.fused_scan = std::strcmp(v, "0") != 0;
    else {
      std::fprintf(stderr, "usage: negmine-cuda-bench [--scan_n=N] [--tree_n=N] [--dim=D] "
                           "[--k=K] [--reps=R] [--fused_scan=0|1] [--out=FILE]\n");
      return 2;
    }
  }
  // As the server does: keep freed heap memory instead of returning it to
  // the kernel, so that every batch's results do not fault fresh pages.
  mallopt(M_MMAP_THRESHOLD, 256 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    std::fprintf(stderr, "no CUDA device\n");
    return 1;
  }
  Say("# negmine CUDA bench on %s (%d SMs, %.0f GB)\n\n", prop.name, prop.multiProcessorCount,
      prop.totalGlobalMem / 1e9);
  const double copy_bw = CopyBandwidth();
  const double peak = GemmPeak();
  Say("Ceilings measured in this run: device-to-device copy %.2f TB/s (read + write); "
      "float16 GEMM 8192^3 %.0f TFLOP/s.\n",
      copy_bw / 1e12, peak / 1e12);
  if (f.scan_n > 0) ScanSection(f, copy_bw, peak);
  if (f.tree_n > 0) TreeSection(f);
  if (!f.out.empty()) {
    if (FILE* out = std::fopen(f.out.c_str(), "w")) {
      std::fputs(report.c_str(), out);
      std::fclose(out);
    }
  }
  return 0;
}
