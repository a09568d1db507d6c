// MetricsHttpServer: the metrics port. It answers `GET /metrics` (and HEAD)
// with the Prometheus text format of its collectables, and nothing else:
// the path must be exactly "/metrics" (a query string is ignored), so
// "/metricsX", "/metrics/" and "//metrics" are 404, other methods 405.
// (prometheus-cpp's Exposer matches paths by prefix and normalizes them.)
//
// One thread accepts and answers connections one at a time (a scrape every
// few seconds needs no more); a client that sends nothing for 5 s is
// dropped. HTTP/1.0 and 1.1, one request per connection.
//
//   auto http = MetricsHttpServer::Start("127.0.0.1:9464", {registry, process});
//
// Thread safety: Start and the destructor from one thread; the collectables
// are collected on the server's thread.
#ifndef NEGMINE_SERVER_METRICS_HTTP_H_
#define NEGMINE_SERVER_METRICS_HTTP_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <prometheus/collectable.h>

#include "absl/status/statusor.h"

namespace negmine::server {

class MetricsHttpServer {
 public:
  // Listens on `address` ("host:port"; port 0 picks one).
  //   INVALID_ARGUMENT: the address does not parse or resolve.
  //   UNAVAILABLE: it cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::vector<std::weak_ptr<prometheus::Collectable>> collectables);
  // Stops listening and joins the thread.
  ~MetricsHttpServer();

  int port() const { return port_; }

  // The response to one raw request head (exposed for tests).
  std::string Respond(const std::string& request_head) const;

 private:
  MetricsHttpServer(int fd, int port, std::vector<std::weak_ptr<prometheus::Collectable>> c);
  void Loop();

  const int fd_;
  const int port_;
  const std::vector<std::weak_ptr<prometheus::Collectable>> collectables_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_METRICS_HTTP_H_
