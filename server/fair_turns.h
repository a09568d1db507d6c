// FairTurns: the bulk requests' turns at the CPU (core/index.h, UnitTurns).
// `slots` units run at once; a unit that wants to run waits its turn in
// arrival order, so a request that finished a unit and asks again queues
// behind the others: a large request no longer holds the bulk pool's CPU
// until it is done, and its units interleave round robin with the others'.
//
// Thread safety: Acquire and Release may be called from any thread.
#ifndef NEGMINE_SERVER_FAIR_TURNS_H_
#define NEGMINE_SERVER_FAIR_TURNS_H_

#include <cstdint>

#include "absl/synchronization/mutex.h"
#include "core/index.h"

namespace negmine::server {

class FairTurns final : public UnitTurns {
 public:
  explicit FairTurns(int slots) : free_(slots < 1 ? 1 : slots) {}

  void Acquire() override {
    absl::MutexLock lock(&mu_);
    const uint64_t ticket = next_ticket_++;
    auto mine = [this, ticket]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return free_ > 0 && serving_ == ticket;
    };
    mu_.Await(absl::Condition(&mine));
    ++serving_;
    --free_;
  }
  void Release() override {
    absl::MutexLock lock(&mu_);
    ++free_;
  }
  // Units waiting for their turn (for tests and metrics).
  uint64_t waiting() const {
    absl::MutexLock lock(&mu_);
    return next_ticket_ - serving_;
  }

 private:
  mutable absl::Mutex mu_;
  int free_ ABSL_GUARDED_BY(mu_);
  uint64_t next_ticket_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t serving_ ABSL_GUARDED_BY(mu_) = 0;  // the next ticket to run
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_FAIR_TURNS_H_
