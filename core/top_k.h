// Top-k selection shared by the indexes: a hit, the one total order on hits
// (higher score first, ties by lower id, so that results are deterministic),
// and a bounded heap that keeps the best m.
//
// Thread safety: TopHeap is not shared between threads.
#ifndef NEGMINE_CORE_TOP_K_H_
#define NEGMINE_CORE_TOP_K_H_

#include <algorithm>
#include <cstdint>
#include <vector>

namespace negmine {

struct Hit {
  float score;
  uint64_t id;   // target id
  uint32_t row;  // store row
};

// Strict "ranks before": a total order, so top-k is deterministic under ties.
inline bool RanksBefore(const Hit& a, const Hit& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// The m best hits pushed so far. Push each target at most once.
class TopHeap {
 public:
  explicit TopHeap(size_t m) : m_(m) { heap_.reserve(m + 1); }

  void Push(const Hit& h) {
    if (m_ == 0) return;
    if (heap_.size() < m_) {
      heap_.push_back(h);
      std::push_heap(heap_.begin(), heap_.end(), RanksBefore);
    } else if (RanksBefore(h, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), RanksBefore);
      heap_.back() = h;
      std::push_heap(heap_.begin(), heap_.end(), RanksBefore);
    }
  }
  bool full() const { return heap_.size() >= m_; }
  // The m-th best score; only once full().
  float threshold() const { return heap_.front().score; }
  // The hits, best first.
  std::vector<Hit> Sorted() const {
    std::vector<Hit> v = heap_;
    std::sort(v.begin(), v.end(), RanksBefore);
    return v;
  }

 private:
  size_t m_;
  std::vector<Hit> heap_;  // a min-heap under RanksBefore: the worst on top
};

}  // namespace negmine

#endif  // NEGMINE_CORE_TOP_K_H_
