// The one index contract of negmine.
//
// An Index owns the target embeddings of one collection and answers mining
// queries over them. The exact (brute-force) index implements it and is the
// oracle; the tree index and the CUDA backend implement the same interface.
//
// Data layout, stated once for every span of vectors in this library:
// vectors are row-major float32, n rows of `dim` components, so component j
// of vector i is x[i * dim + j].
//
// Scores: s(q, y) = <q, x(y)> for Metric::kInnerProduct, and
// <q, x(y)> / (||q|| ||x(y)||) for Metric::kCosine. Stored vectors are kept
// exactly as given (Get returns them bit-exactly); cosine normalization is
// applied when scoring.
//
// Example:
//   ASSIGN_OR_RETURN(std::unique_ptr<Index> index,
//                    CreateIndex({.dim = 64, .metric = Metric::kCosine}));
//   RETURN_IF_ERROR(index->Upsert(ids, vectors, /*model_step=*/0));
//   SearchParams params{.mode = MineMode::kTopK, .k = 16};
//   ASSIGN_OR_RETURN(SearchResult r, index->Search(queries, {}, params));
//
// Thread safety: every method may be called concurrently from any thread.
// Writers (Upsert, Delete) are serialized with each other; a Search sees
// either all or none of a write, and reports the version it saw.
#ifndef NEGMINE_CORE_INDEX_H_
#define NEGMINE_CORE_INDEX_H_

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace negmine {

enum class Metric { kInnerProduct, kCosine };

// Where the index lives. kAuto picks CUDA when it is built and a device is
// present, and the CPU otherwise.
enum class Backend { kAuto, kCpu, kCuda };

// How the CUDA backend stores the scoring vectors on the device: float32, or
// 16-bit (half the memory and bandwidth, tensor cores; scores then carry
// about 3 significant digits, bfloat16 about 2). The host copy is float32.
enum class DeviceDtype { kFloat32, kFloat16, kBFloat16 };

// Which index structure. kExact is brute force: the oracle. kTree is the
// dynamic ball tree (core/tree/), the default of a collection.
enum class IndexKind { kExact, kTree };

enum class MineMode {
  kTopK,    // the k highest-scoring targets
  kSample,  // k draws from the softmax at `temperature`
  kMixed,   // the top `num_hard`, then k - num_hard softmax draws from the rest
};

enum class Sampler {
  kProposal,  // a cheap proposal close to the softmax, with its exact log q
  kExact,     // exact draws from the softmax
};

const char* MetricName(Metric m);
const char* BackendName(Backend b);
const char* IndexKindName(IndexKind k);
const char* DeviceDtypeName(DeviceDtype t);

struct IndexOptions {
  // Number of components per vector. Must be in [1, kMaxDim].
  int dim = 0;
  Metric metric = Metric::kInnerProduct;
  Backend backend = Backend::kAuto;
  // Backend kCuda (or kAuto on a GPU) only.
  DeviceDtype device_dtype = DeviceDtype::kFloat32;
  IndexKind kind = IndexKind::kExact;
  // Reserve room for this many targets up front (a hint, not a limit).
  size_t initial_capacity = 0;

  // kTree only.
  struct Tree {
    int leaf_size = 64;   // targets per leaf at build (split at 2x)
    int branching = 16;   // children per node at build
    // Maintain the tree in the background: rebuild the subtrees whose
    // measured looseness is high (checked after every size/16 writes and
    // every drift update, at most every 30 s), and the whole tree once the
    // targets written since the last build (inserted, updated or deleted)
    // exceed half of its size.
    bool background_rebuild = true;
  } tree;

  // Drift correction (core/drift/drift.h).
  struct Drift {
    // Landmarks per set; 0 means 4 * dim, at least 64. Capped at the
    // collection's size when the set is chosen.
    int num_landmarks = 0;
    // Re-base after a fit whose held-out residual exceeds this; 0: never.
    double rebase_residual = 0;
    // Re-base every this many steps since the last re-base; 0: never.
    int64_t rebase_every_steps = 0;
    uint64_t seed = 1;
  } drift;

  static constexpr int kMaxDim = 65536;
};

// Controls against false negatives (SearchParams::filters), for every mode.
// A target a filter removes is not eligible: kTopK returns the best eligible
// targets, sampling draws from the distribution restricted to them, log Z is
// over them. The margins use s_pos, the query's lowest positive score
// (SearchParams::positives), and need positives. Every control is off by
// default.
struct MineFilters {
  static constexpr float kInf = std::numeric_limits<float>::infinity();
  float min_score = -kInf;  // drop s < min_score
  float max_score = kInf;   // drop s > max_score
  // >= 0: drop s > s_pos - absolute_margin. NaN: off.
  float absolute_margin = std::numeric_limits<float>::quiet_NaN();
  // >= 0: drop s > s_pos - |s_pos| relative_margin. NaN: off.
  float relative_margin = std::numeric_limits<float>::quiet_NaN();
  // In (0, 1]: drop a candidate whose cosine to one of the query's positives,
  // or to a negative already taken for it, is >= dedupe_cosine. 0: off.
  float dedupe_cosine = 0;

  bool margins() const { return absolute_margin == absolute_margin || relative_margin == relative_margin; }
  // Written out (NaN == NaN here: both off).
  bool operator==(const MineFilters& o) const {
    auto same = [](float a, float b) { return a == b || (a != a && b != b); };
    return min_score == o.min_score && max_score == o.max_score &&
           same(absolute_margin, o.absolute_margin) &&
           same(relative_margin, o.relative_margin) && dedupe_cosine == o.dedupe_cosine;
  }
};

// What kSample and kMixed draw from.
enum class SampleDistribution {
  kSoftmax,  // softmax(s / temperature) over the eligible targets
  // SimANS (Zhou et al. 2022): weights exp(-a (s - s_pos - b)^2) over the
  // `candidates` highest-scoring eligible targets (after the rank window and
  // MIXED's top part); needs positives. log q is exact.
  kSimans,
};

struct SimansParams {
  float a = 0.5f;
  float b = 0;
  int candidates = 100;  // K >= k
  bool operator==(const SimansParams& o) const {
    return a == o.a && b == o.b && candidates == o.candidates;
  }
};

// The knobs of SearchParams that decide what a search returns per query
// (apart from the queries and their exclusions), comparable: two calls with
// equal specs may be served as one batch. The seed counts only when sampling.
struct SearchSpec {
  MineMode mode = MineMode::kTopK;
  Sampler sampler = Sampler::kProposal;
  int k = 10;
  float temperature = 0.05f;
  int num_hard = 0;
  bool with_replacement = false;
  int rank_offset = 0;
  bool want_log_z = false;
  uint64_t seed = 0;  // 0 for kTopK
  MineFilters filters;
  SampleDistribution distribution = SampleDistribution::kSoftmax;
  SimansParams simans;
  // Tree-only knobs (the exact index ignores them), as SearchParams below.
  struct Tree {
    bool approximate = false;
    int beam_width = 0;
    double log_z_width = 1e-2;
    bool operator==(const Tree& o) const {
      return approximate == o.approximate && beam_width == o.beam_width &&
             log_z_width == o.log_z_width;
    }
  } tree;
  // Field by field (written out: the CUDA sources build as C++17).
  bool operator==(const SearchSpec& o) const {
    return mode == o.mode && sampler == o.sampler && k == o.k &&
           temperature == o.temperature && num_hard == o.num_hard &&
           with_replacement == o.with_replacement && rank_offset == o.rank_offset &&
           want_log_z == o.want_log_z && seed == o.seed && filters == o.filters &&
           distribution == o.distribution && simans == o.simans && tree == o.tree;
  }
  bool operator!=(const SearchSpec& o) const { return !(*this == o); }
};

// Turns for work units (SearchParams::turns): a server shares one among its
// large requests so that their work units take turns on the CPU, round
// robin, instead of one request running whole before the next starts.
// Acquire and Release are called around each unit with the index's reader
// lock held; they must not wait on the index.
class UnitTurns {
 public:
  virtual ~UnitTurns() = default;
  virtual void Acquire() = 0;  // blocks until this unit may run
  virtual void Release() = 0;
};

// Per-call knobs of Search. Every field has a sane default; only k is usually
// set by the caller.
struct SearchParams {
  MineMode mode = MineMode::kTopK;
  Sampler sampler = Sampler::kProposal;
  // Results per query. Must be >= 1 and <= the collection's size.
  int k = 10;
  // Softmax temperature tau for kSample / kMixed; must be > 0 and finite.
  float temperature = 0.05f;
  // kMixed only: how many of the k results are the hardest (top) targets.
  // Must be <= k.
  int num_hard = 0;
  // Draw with replacement (the same target may repeat) or without.
  bool with_replacement = false;
  // Rank window: the `rank_offset` highest-scoring eligible targets are
  // skipped by every mode (they are likely false negatives). Sampling is then
  // from the softmax restricted to the remaining targets.
  int rank_offset = 0;
  // Controls against false negatives (MineFilters above).
  MineFilters filters;
  // Either empty, or one list per query: its positives (ids in the
  // collection; NOT_FOUND otherwise). They are always excluded, scored
  // (QueryResult::positive_scores), and give s_pos to the margins and SimANS.
  absl::Span<const std::vector<uint64_t>> positives;
  SampleDistribution distribution = SampleDistribution::kSoftmax;
  SimansParams simans;  // distribution kSimans only
  // Top-k only: allow approximate search (ignored by the exact index).
  bool approximate = false;
  // Leaves an approximate search scores per query (0: the index's default,
  // 256 on the CPU tree, recall@64 about 0.97 on drift-bench data).
  int beam_width = 0;
  // Report the log partition function over the eligible targets.
  bool want_log_z = false;
  // Width (in nats) to which the tree tightens its certified log Z interval,
  // for want_log_z and for the exact sampler's log q. Smaller costs more
  // scoring; 0 refines until exact.
  double log_z_width = 1e-2;
  // Seed for sampling. Query i of a call uses the stream
  // (seed, stream_offset + i), so a call with a fixed seed is reproducible.
  uint64_t seed = 0;
  // Added to each query's stream number. The work units of one call set it
  // to their first query's position, so that a batch searched in units draws
  // what the whole batch would. The device path runs a batch whole and
  // ignores it.
  uint64_t stream_offset = 0;
  // Polled between queries (and query chunks); when it returns true the
  // search stops with CANCELLED (the caller's client went away or its
  // deadline passed). Empty: never.
  std::function<bool()> cancelled;
  // On the CPU, a batch is searched in work units of at most this many
  // queries, one after the other under the same read lock (so the whole
  // batch sees one version), and `cancelled` is polled between them: a
  // cancelled batch stops within one unit, and no unit's scratch grows with
  // the batch. The results equal one search of the whole batch, samples
  // included (each unit's stream_offset is its first query's position), up
  // to the rounding of the matrix products, whose summation order depends on
  // the batch's shape.
  // 0: the whole batch at once.
  int work_unit_queries = 256;
  // Taken around each work unit on the CPU (null: none).
  UnitTurns* turns = nullptr;

  // How the k results of a query split: the top part (k for kTopK,
  // num_hard for kMixed, 0 for kSample), then the samples.
  int num_top() const {
    return mode == MineMode::kTopK ? k : mode == MineMode::kMixed ? num_hard : 0;
  }
  int num_samples() const { return k - num_top(); }

  // The fields that decide the results, apart from the per-query lists
  // (not the stream offset, the cancellation or the work units).
  SearchSpec Spec() const {
    return {.mode = mode, .sampler = sampler, .k = k, .temperature = temperature,
            .num_hard = num_hard, .with_replacement = with_replacement,
            .rank_offset = rank_offset, .want_log_z = want_log_z,
            .seed = mode == MineMode::kTopK ? 0 : seed,
            .filters = filters, .distribution = distribution, .simans = simans,
            .tree = {.approximate = approximate, .beam_width = beam_width,
                     .log_z_width = log_z_width}};
  }
};

// Why targets were not eligible for one query. With num_eligible they add
// up to the live targets: excluded + positives + max_score + min_score +
// absolute_margin + relative_margin + num_eligible. A target several score
// filters remove counts once, under the first of max_score, min_score,
// absolute_margin, relative_margin. rank_offset and dedupe count eligible
// targets the rank window skipped and the dedupe dropped.
struct FilterCounts {
  size_t excluded = 0;  // live, in the exclude list, not a positive
  size_t positives = 0;
  size_t max_score = 0, min_score = 0, absolute_margin = 0, relative_margin = 0;
  size_t rank_offset = 0, dedupe = 0;
  void Add(const FilterCounts& o) {
    excluded += o.excluded, positives += o.positives, max_score += o.max_score;
    min_score += o.min_score, absolute_margin += o.absolute_margin;
    relative_margin += o.relative_margin, rank_offset += o.rank_offset, dedupe += o.dedupe;
  }
};

// Results for one query, ordered: the top-k part first (by descending score,
// ties by ascending id), then the sampled part in draw order.
struct QueryResult {
  std::vector<uint64_t> ids;
  std::vector<float> scores;
  // log q(y) for each result: 0 for deterministic (top-k) results, and for
  // sampled results the log-probability of y under the distribution each
  // draw was made from (for the exact sampler: s(y)/tau - log Z over the
  // eligible targets).
  std::vector<float> log_q;
  // How many leading results are top-k (the rest are samples).
  int num_top = 0;
  // Live targets this query could get, at the searched version: not
  // excluded, not a positive, inside the filters' score window (before the
  // rank window and the dedupe). Fewer than k results come back only when
  // num_eligible - removed.rank_offset - removed.dedupe < k.
  size_t num_eligible = 0;
  FilterCounts removed;
  // The query's positives' scores, in the order given.
  std::vector<float> positive_scores;
  // Set when fewer than k results came back: why, in words.
  std::string shortfall;
  // A certified interval for log Z = log sum_y exp(s(q, y) / tau) over the
  // eligible targets, when SearchParams::want_log_z. lo == hi when exact.
  double log_z_lo = std::numeric_limits<double>::quiet_NaN();
  double log_z_hi = std::numeric_limits<double>::quiet_NaN();
};

struct SearchResult {
  std::vector<QueryResult> queries;
  uint64_t index_version = 0;  // the version the search ran against
};

// The shape of a tree index, for GetIndexInfo.
struct TreeSummary {
  size_t num_nodes = 0;       // reachable nodes
  size_t num_leaves = 0;
  size_t num_dead_nodes = 0;  // cut off by merges, until a rebuild compacts
  int depth = 0;
  size_t min_leaf = 0, max_leaf = 0;
  double mean_leaf = 0;
  // Bucket i counts leaves with size in [i * leaf_size / 4,
  // (i + 1) * leaf_size / 4); the last bucket is open-ended.
  std::vector<size_t> leaf_size_histogram;
  // Max over nodes of the stored radius over the radius a fresh build would
  // give (around the mean of the node's targets; 1 = tight).
  double looseness = 1.0;
  uint64_t rebuilds = 0;
  // Loose subtrees rebuilt alone (between full rebuilds).
  uint64_t subtree_rebuilds = 0;
  double last_rebuild_seconds = 0;
  // Nodes visited (internal expansions plus leaves scored) per query in the
  // last Search call.
  double visits_per_query = 0;
  // A background rebuild is requested and not installed yet.
  bool rebuild_pending = false;
  // The exact sampler's draws proposed and accepted since the start (their
  // ratio is its acceptance rate).
  uint64_t sampler_proposals = 0;
  uint64_t sampler_accepted = 0;
};

// The landmarks a trainer re-encodes for ApplyDrift. `epoch` names the set;
// it changes at every re-base.
struct LandmarkSet {
  std::vector<uint64_t> ids;
  uint64_t epoch = 0;
  bool chosen = false;  // this call chose the set (a change of state)
};

// One drift update at the trainer's `model_step`: either the landmarks
// re-encoded by the current model, or an exact linear map of the embeddings.
struct DriftUpdate {
  int64_t model_step = 0;
  // The set the landmark embeddings are for (LandmarkSet::epoch).
  uint64_t landmark_epoch = 0;
  // m x dim, in LandmarkSet order. Non-empty for a landmark update.
  absl::Span<const float> landmark_embeddings;
  // dim x dim (new = a old + b, a row-major) and dim (or empty: zero), for
  // a linear-map update.
  absl::Span<const float> linear_a;
  absl::Span<const float> linear_b;
};

struct DriftReport {
  double heldout_residual = 0;  // relative fit error, landmarks held out
  double stale_residual = 0;    // the same error with no correction
  const char* kernel = "none";  // the model chosen
  double lambda = 0;
  bool rebased = false;         // the update ended with a re-base
  uint64_t landmark_epoch = 0;  // the set for the next landmark update
  uint64_t index_version = 0;
  double fit_seconds = 0;       // fitting the model
  double apply_seconds = 0;     // correcting every target and the index
};

// The drift state, for GetIndexInfo.
struct DriftSummary {
  bool active = false;          // a drift update has been applied
  int64_t step = 0;             // model_step of the last update
  uint64_t landmark_epoch = 0;  // 0 until landmarks are first chosen
  size_t num_landmarks = 0;
  const char* kernel = "none";
  double lambda = 0;
  double heldout_residual = 0;
  double stale_residual = 0;
  uint64_t updates = 0;
  uint64_t rebases = 0;
  double last_fit_seconds = 0;
  double last_apply_seconds = 0;
  // Live targets by staleness (step - the model_step they were written
  // with): [0], [1, 10), [10, 100), [100, 1000), [1000, inf). Empty until
  // active.
  std::vector<size_t> staleness_histogram;
};

// Summary of an index, for GetIndexInfo.
struct IndexStats {
  size_t num_targets = 0;
  size_t capacity_rows = 0;
  size_t memory_bytes = 0;         // host
  size_t device_memory_bytes = 0;  // GPU (CUDA backend)
  uint64_t version = 0;
};

class Index {
 public:
  virtual ~Index() = default;

  virtual const IndexOptions& options() const = 0;
  // Where searches run: kCpu or kCuda (kAuto resolved at creation).
  virtual Backend active_backend() const { return Backend::kCpu; }
  virtual IndexStats Stats() const = 0;
  // The version a search started now would see. The indexes of this
  // library answer it cheaply (no scan, and no wait for a search running on
  // a device); a wrapper that does not override it pays for Stats().
  virtual uint64_t version() const { return Stats().version; }
  // The tree's shape, for a tree index; O(N) (it measures looseness).
  virtual std::optional<TreeSummary> TreeInfo() const { return std::nullopt; }

  // Inserts or replaces the targets `ids` with `vectors` (ids.size() x dim,
  // layout above), recording `model_step` for each. All or nothing: on error
  // the index is unchanged.
  //   INVALID_ARGUMENT: size mismatch, a duplicate id within `ids`, a NaN or
  //     Inf component, or (cosine) a zero vector.
  virtual absl::Status Upsert(absl::Span<const uint64_t> ids,
                              absl::Span<const float> vectors,
                              int64_t model_step) = 0;

  // Deletes `ids`. All or nothing: if any id is unknown and `allow_missing`
  // is false, returns NOT_FOUND naming it and deletes nothing. Returns the
  // number of targets deleted.
  virtual absl::StatusOr<size_t> Delete(absl::Span<const uint64_t> ids,
                                        bool allow_missing) = 0;

  // Copies the stored vectors of `ids` into `vectors` (resized to
  // ids.size() x dim) and their model steps into `steps`.
  //   NOT_FOUND: an unknown id (named in the message).
  virtual absl::Status Get(absl::Span<const uint64_t> ids,
                           std::vector<float>* vectors,
                           std::vector<int64_t>* steps) const = 0;

  // The vectors the index scores `ids` with: drift-corrected once a drift
  // update is applied, and for cosine scaled to unit length. ids.size() x dim.
  //   NOT_FOUND: an unknown id.
  virtual absl::Status GetScored(absl::Span<const uint64_t> ids,
                                 std::vector<float>* vectors) const = 0;

  // The current landmark set, chosen (k-means++ over the targets) on the
  // first call and at every re-base.
  //   FAILED_PRECONDITION: the collection is empty.
  virtual absl::StatusOr<LandmarkSet> GetLandmarks() = 0;

  // Fits the drift model to `update` and corrects every target's scoring
  // vector and the index, atomically: a Search sees the old or the new
  // state, and the version goes up. A linear map is applied exactly and
  // starts a new landmark set. Queries are not blocked while it runs.
  //   INVALID_ARGUMENT: a bad shape, a NaN or Inf, or both or neither of
  //     landmark embeddings and linear map.
  //   FAILED_PRECONDITION: model_step below the last update's, the landmark
  //     epoch is not the current set's (call GetLandmarks again), or no
  //     landmarks were chosen yet.
  virtual absl::StatusOr<DriftReport> ApplyDrift(const DriftUpdate& update) = 0;

  virtual DriftSummary DriftInfo() const = 0;

  // The whole state (vectors, ids, steps, version, drift state, and a tree
  // index's tree) as bytes that Restore takes back.
  // Consistent: taken between writes.
  virtual absl::StatusOr<std::string> Snapshot() const = 0;
  // Replaces the state with a Snapshot's (of an index with the same dim).
  //   DATA_LOSS: the bytes do not parse or are inconsistent; the index is
  //     unchanged.
  virtual absl::Status Restore(std::string_view snapshot) = 0;

  // Mines for each of the queries (n x dim, layout above). `exclude` is
  // either empty or has one list per query: ids never returned for, nor
  // counted in the softmax of, that query. Unknown excluded ids are ignored.
  //   INVALID_ARGUMENT: a bad shape or parameter (named in the message).
  virtual absl::StatusOr<SearchResult> Search(
      absl::Span<const float> queries,
      absl::Span<const std::vector<uint64_t>> exclude,
      const SearchParams& params) const = 0;
};

// Checks `params` against an index of `num_targets` targets; the message names
// the offending field and value. Shared by every backend and by the server.
absl::Status ValidateSearchParams(const SearchParams& params,
                                  size_t num_targets);

// Checks that `values` holds only finite numbers; `what` names the field in
// the message (e.g. "queries").
absl::Status CheckFinite(absl::Span<const float> values, int dim,
                         const char* what);

// Returns the index for `options`.
//   INVALID_ARGUMENT: a bad dim.
//   UNIMPLEMENTED: a backend or kind that is not built.
//   FAILED_PRECONDITION: backend kCuda without a usable device.
absl::StatusOr<std::unique_ptr<Index>> CreateIndex(const IndexOptions& options);

}  // namespace negmine

#endif  // NEGMINE_CORE_INDEX_H_
