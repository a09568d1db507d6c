// Reading the server's metrics in tests, from its registry.
#ifndef NEGMINE_TESTS_METRICS_UTIL_H_
#define NEGMINE_TESTS_METRICS_UTIL_H_

#include <map>
#include <string>

#include <prometheus/metric_family.h>

#include "server/metrics.h"

namespace negmine::testing {

// The value of the first sample of `name` whose labels include `labels` (a
// histogram: its count); -1 when there is none.
inline double MetricValue(const server::Metrics& metrics, const std::string& name,
                          const std::map<std::string, std::string>& labels) {
  for (const prometheus::MetricFamily& f : metrics.registry()->Collect()) {
    if (f.name != name) continue;
    for (const prometheus::ClientMetric& m : f.metric) {
      size_t matched = 0;
      for (const prometheus::ClientMetric::Label& l : m.label) {
        auto it = labels.find(l.name);
        if (it != labels.end() && it->second == l.value) ++matched;
      }
      if (matched != labels.size()) continue;
      switch (f.type) {
        case prometheus::MetricType::Counter: return m.counter.value;
        case prometheus::MetricType::Gauge: return m.gauge.value;
        case prometheus::MetricType::Histogram:
          return static_cast<double>(m.histogram.sample_count);
        default: return -1;
      }
    }
  }
  return -1;
}

}  // namespace negmine::testing

#endif  // NEGMINE_TESTS_METRICS_UTIL_H_
