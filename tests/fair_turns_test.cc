// FairTurns: units run in the order they asked for a turn, so a request that
// asks again after its unit queues behind the others (round robin).
#include "server/fair_turns.h"

#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"

namespace negmine::server {
namespace {

TEST(FairTurnsTest, ARequestAskingAgainQueuesBehindTheOthers) {
  FairTurns turns(/*slots=*/1);
  absl::Mutex mu;
  std::vector<char> order;
  auto unit = [&](char who) {
    turns.Acquire();
    {
      absl::MutexLock lock(&mu);
      order.push_back(who);
    }
    turns.Release();
  };
  // A holds the only turn; B, then C, queue for one.
  turns.Acquire();
  std::thread b([&] { unit('B'); });
  while (turns.waiting() < 1) std::this_thread::yield();
  std::thread c([&] { unit('C'); });
  while (turns.waiting() < 2) std::this_thread::yield();
  // A's next unit asks after them: it runs last.
  turns.Release();
  unit('A');
  b.join();
  c.join();
  EXPECT_EQ(order, (std::vector<char>{'B', 'C', 'A'}));
}

TEST(FairTurnsTest, SlotsRunAtOnce) {
  FairTurns turns(/*slots=*/2);
  turns.Acquire();
  turns.Acquire();  // a second slot: does not block
  EXPECT_EQ(turns.waiting(), 0u);
  turns.Release();
  turns.Release();
}

}  // namespace
}  // namespace negmine::server
