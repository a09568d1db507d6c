// Deterministic random numbers for samplers and data generators.
//
// The same (seed, stream) gives the same sequence on every platform: the
// engine is std::mt19937_64 (fully specified by the standard) and the
// distributions below are written out here, because the standard library's
// distributions are implementation-defined.
//
// Thread safety: an Rng is not shared; make one per thread or per query.
#ifndef NEGMINE_CORE_RANDOM_H_
#define NEGMINE_CORE_RANDOM_H_

#include <cmath>
#include <cstdint>
#include <random>

namespace negmine {

// SplitMix64 finalizer: a bijective 64-bit mix.
inline uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

class Rng {
 public:
  Rng(uint64_t seed, uint64_t stream)
      : engine_(Mix64(seed ^ Mix64(stream + 0x632be59bd9b4e019ULL))) {}

  uint64_t Next() { return engine_(); }

  // Uniform in the open interval (0, 1).
  double Uniform() { return (static_cast<double>(Next() >> 11) + 0.5) * 0x1p-53; }

  // Uniform integer in [0, n), n >= 1.
  uint64_t Below(uint64_t n) { return static_cast<uint64_t>(Uniform() * n) % n; }

  // Standard normal, by Box-Muller.
  double Normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double r = std::sqrt(-2.0 * std::log(Uniform()));
    const double theta = 2.0 * M_PI * Uniform();
    spare_ = r * std::sin(theta);
    has_spare_ = true;
    return r * std::cos(theta);
  }

  // Standard Gumbel: -log(-log U).
  double Gumbel() { return -std::log(-std::log(Uniform())); }

 private:
  std::mt19937_64 engine_;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

}  // namespace negmine

#endif  // NEGMINE_CORE_RANDOM_H_
