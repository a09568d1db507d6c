#include "server/metrics.h"

#include <prometheus/counter.h>

namespace negmine::server {
namespace {

const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
  return *b;
}

const prometheus::Histogram::BucketBoundaries& BatchBuckets() {
  static const auto* b = new prometheus::Histogram::BucketBoundaries{
      1, 4, 16, 64, 256, 1024, 4096, 16384, 65536};
  return *b;
}

}  // namespace

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(prometheus::BuildCounter()
                    .Name("negmine_requests_total")
                    .Help("Finished RPCs, by method and gRPC status code.")
                    .Register(*registry_)),
      latency_(prometheus::BuildHistogram()
                   .Name("negmine_request_duration_seconds")
                   .Help("RPC latency, by method.")
                   .Register(*registry_)),
      negatives_(prometheus::BuildCounter()
                     .Name("negmine_negatives_served_total")
                     .Help("Negatives returned by Mine and MineStream.")
                     .Register(*registry_)
                     .Add({})),
      batch_queries_(prometheus::BuildHistogram()
                         .Name("negmine_mine_batch_queries")
                         .Help("Queries per mining request.")
                         .Register(*registry_)
                         .Add({}, BatchBuckets())),
      targets_(prometheus::BuildGauge()
                   .Name("negmine_collection_targets")
                   .Help("Live targets per collection.")
                   .Register(*registry_)),
      version_(prometheus::BuildGauge()
                   .Name("negmine_index_version")
                   .Help("Index version per collection.")
                   .Register(*registry_)),
      drift_step_(prometheus::BuildGauge()
                      .Name("negmine_drift_step")
                      .Help("Model step of the last drift update, per collection.")
                      .Register(*registry_)),
      drift_residual_(prometheus::BuildGauge()
                          .Name("negmine_drift_residual")
                          .Help("Held-out relative residual of the last drift fit, "
                                "per collection.")
                          .Register(*registry_)),
      drift_rebases_(prometheus::BuildCounter()
                         .Name("negmine_drift_rebases_total")
                         .Help("Drift re-bases (new frame and landmarks), per "
                               "collection.")
                         .Register(*registry_)) {}

void Metrics::ObserveRequest(const std::string& method, const std::string& code,
                             double seconds) {
  requests_.Add({{"method", method}, {"code", code}}).Increment();
  latency_.Add({{"method", method}}, LatencyBuckets()).Observe(seconds);
}

void Metrics::ObserveMine(size_t queries, size_t negatives) {
  batch_queries_.Observe(static_cast<double>(queries));
  negatives_.Increment(static_cast<double>(negatives));
}

void Metrics::SetCollection(const std::string& collection, double targets,
                            double version) {
  targets_.Add({{"collection", collection}}).Set(targets);
  version_.Add({{"collection", collection}}).Set(version);
}

void Metrics::SetDrift(const std::string& collection, double step,
                       double residual, bool rebased) {
  drift_step_.Add({{"collection", collection}}).Set(step);
  drift_residual_.Add({{"collection", collection}}).Set(residual);
  prometheus::Counter& rebases = drift_rebases_.Add({{"collection", collection}});
  if (rebased) rebases.Increment();
}

void Metrics::RemoveCollection(const std::string& collection) {
  const prometheus::Labels labels = {{"collection", collection}};
  targets_.Remove(&targets_.Add(labels));
  version_.Remove(&version_.Add(labels));
  if (drift_step_.Has(labels)) {
    drift_step_.Remove(&drift_step_.Add(labels));
    drift_residual_.Remove(&drift_residual_.Add(labels));
    drift_rebases_.Remove(&drift_rebases_.Add(labels));
  }
}

}  // namespace negmine::server
