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

void Metrics::RemoveCollection(const std::string& collection) {
  targets_.Remove(&targets_.Add({{"collection", collection}}));
  version_.Remove(&version_.Add({{"collection", collection}}));
}

}  // namespace negmine::server
