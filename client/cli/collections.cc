// create, list, drop, info and snapshot.
#include <cinttypes>
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/cli/commands.h"

namespace negmine::client::cli {
namespace {

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

}  // namespace

absl::StatusOr<uint32_t> CollectionDim(Client& c, const std::string& collection) {
  CLI_ASSIGN(info, c.GetIndexInfo(collection));
  return info.info().config().dim();
}

absl::Status Create(Client& c, const Args& a) {
  CLI_ASSIGN(name, a.Required("collection"));
  CLI_ASSIGN(dim, a.Number<uint32_t>("dim", 0));
  v1::CollectionConfig config;
  config.set_name(name);
  config.set_dim(dim);
  // Inner product by default, as the wire's METRIC_UNSPECIFIED means.
  const std::string metric = a.Get("metric", "inner_product");
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

absl::Status List(Client& c, const Args& a) {
  CLI_CHECK(a.CheckAllUsed());
  return Info(c, a);
}

absl::Status Drop(Client& c, const Args& a) {
  CLI_ASSIGN(collection, a.Required("collection"));
  CLI_CHECK(a.CheckAllUsed());
  CLI_CHECK(c.DropCollection(collection));
  std::printf("dropped '%s'\n", collection.c_str());
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

absl::Status Snapshot(Client& c, const Args& a) {
  CLI_CHECK(a.CheckAllUsed());
  CLI_ASSIGN(resp, c.CreateSnapshot());
  std::printf("wrote %s (%" PRIu64 " bytes)\n", resp.path().c_str(), resp.bytes());
  return absl::OkStatus();
}

}  // namespace negmine::client::cli
