// The build's identity, compiled alone so that a new commit recompiles
// only this file. NEGMINE_VERSION and NEGMINE_GIT_COMMIT come from CMake at
// configure time (server/CMakeLists.txt).
#include "core/cuda/device.h"
#include "server/metrics.h"

#ifndef NEGMINE_VERSION
#define NEGMINE_VERSION "unknown"
#endif
#ifndef NEGMINE_GIT_COMMIT
#define NEGMINE_GIT_COMMIT "unknown"
#endif

namespace negmine::server {

BuildInfo GetBuildInfo() {
  return {.version = NEGMINE_VERSION,
          .commit = NEGMINE_GIT_COMMIT,
          .backends = CudaBuilt() ? "cpu,cuda" : "cpu"};
}

}  // namespace negmine::server
