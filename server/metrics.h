// The server's Prometheus metrics: every family registered once, at startup,
// into this struct of references. Labels are low-cardinality (method, code,
// collection), never request ids.
//
// Thread safety: prometheus-cpp metrics are safe to update from any thread.
#ifndef NEGMINE_SERVER_METRICS_H_
#define NEGMINE_SERVER_METRICS_H_

#include <memory>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

namespace negmine::server {

class Metrics {
 public:
  Metrics();

  const std::shared_ptr<prometheus::Registry>& registry() const {
    return registry_;
  }

  // One finished RPC: its method, canonical code name and latency.
  void ObserveRequest(const std::string& method, const std::string& code,
                      double seconds);
  // One mining request of `queries` queries that returned `negatives`.
  void ObserveMine(size_t queries, size_t negatives);
  // The current size and version of a collection.
  void SetCollection(const std::string& collection, double targets,
                     double version);
  void RemoveCollection(const std::string& collection);
  // After a drift update of a collection.
  void SetDrift(const std::string& collection, double step, double residual,
                bool rebased);

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& latency_;
  prometheus::Counter& negatives_;
  prometheus::Histogram& batch_queries_;
  prometheus::Family<prometheus::Gauge>& targets_;
  prometheus::Family<prometheus::Gauge>& version_;
  prometheus::Family<prometheus::Gauge>& drift_step_;
  prometheus::Family<prometheus::Gauge>& drift_residual_;
  prometheus::Family<prometheus::Counter>& drift_rebases_;
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_METRICS_H_
