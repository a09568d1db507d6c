// The one boundary between wire types (negmine.v1 protobufs) and core types.
//
// Every check of a request's shape happens here or in core, and every error
// message names the field and the offending value. A handler decodes its
// request with a From* function, calls the core (or the commit path with
// the WalEntry decoded here), and encodes the answer with a ToWire* one.
//
// Thread safety: all functions are pure.
#ifndef NEGMINE_SERVER_WIRE_H_
#define NEGMINE_SERVER_WIRE_H_

#include <cstdint>
#include <string>
#include <vector>

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/batches/gcbs.h"
#include "core/index.h"
#include "core/persist/wal_entry.h"
#include "negmine/v1/negmine.pb.h"

namespace negmine::server {

// absl::Status -> grpc::Status; the codes map one-to-one.
grpc::Status ToGrpc(const absl::Status& status);

// Size in bytes of one element of `dtype`; 0 for an unknown dtype.
size_t DTypeSize(int dtype);

// Decodes `m` to float32, row-major. `field` names it in errors ("queries").
// Checks: a known dtype, rows >= 1, cols == `want_cols`, and that `data` has
// exactly rows * cols * sizeof(dtype) bytes. Values are not checked here
// (core rejects NaN/Inf and names the element).
absl::StatusOr<std::vector<float>> DecodeMatrix(const v1::Matrix& m,
                                                const char* field,
                                                uint32_t want_cols);

// Encodes rows x cols float32 values as a FLOAT32 Matrix.
void EncodeMatrix(absl::Span<const float> values, uint32_t rows, uint32_t cols,
                  v1::Matrix* out);

// Converts wire params; unknown enum values are INVALID_ARGUMENT. The result
// still goes through core's ValidateSearchParams.
absl::StatusOr<SearchParams> ToSearchParams(const v1::MineParams& p);

// Collection config <-> core options.
absl::StatusOr<IndexOptions> ToIndexOptions(const v1::CollectionConfig& c);
void ToWireConfig(const std::string& name, const IndexOptions& o,
                  v1::CollectionConfig* out);
void ToWireTreeInfo(const TreeSummary& t, v1::TreeInfo* out);
void ToWireDriftInfo(const DriftSummary& d, v1::DriftInfo* out);

// A collection's config, size, version and backend.
void ToWireCollectionInfo(const std::string& name, const Index& index,
                          v1::CollectionInfo* out);

// The change an UpsertTargets message asks for, on `collection` of `dim`.
absl::StatusOr<WalEntry> FromUpsertRequest(const v1::UpsertTargetsRequest& r,
                                           const std::string& collection, uint32_t dim);
// The change a DeleteTargets request asks for.
absl::StatusOr<WalEntry> FromDeleteRequest(const v1::DeleteTargetsRequest& r);
// The change an ApplyDrift request asks for, on `collection` of `dim`.
absl::StatusOr<WalEntry> FromApplyDriftRequest(const v1::ApplyDriftRequest& r,
                                               const std::string& collection, uint32_t dim);
void ToWireDriftReport(const DriftReport& report, v1::ApplyDriftResponse* out);

// A MineRequest decoded against a collection of `dim` and the server's
// limits: the queries (n x dim), the per-query exclusions (none, or one
// list per query: the one place that count is checked) and the params.
struct MineLimits {
  uint32_t max_batch = 65536;
  uint32_t max_k = 4096;
  uint64_t max_message_bytes = 64 << 20;
};
struct MineInput {
  std::vector<float> queries;
  uint32_t n = 0;
  std::vector<std::vector<uint64_t>> exclude;
  // params.positives points into it.
  std::vector<std::vector<uint64_t>> positives;
  SearchParams params;
};
//   INVALID_ARGUMENT: a bad matrix, too many queries, exclude or positives
//     lists that do not match the queries, a bad param, k over max_k, or a response that
//     could not fit in max_message_bytes (the message says how to split).
absl::StatusOr<MineInput> FromMineRequest(const v1::MineRequest& r, uint32_t dim,
                                          const MineLimits& limits);
// Moves `result` into `out`; returns the number of negatives.
size_t ToWireMineResponse(SearchResult& result, bool want_log_z, v1::MineResponse* out);

// AssignBatches: the options of the stream's first message (`dim` from its
// queries.cols), and the examples of each message appended to `queries`
// and `positives`; `message` (1-based) names it in errors.
absl::Status FromAssignBatchesOptions(const v1::AssignBatchesRequest& first,
                                      BatchOptions* options, bool* async, uint32_t* dim);
absl::Status AppendExamples(const v1::AssignBatchesRequest& r, uint32_t dim, size_t message,
                            std::vector<float>* queries, std::vector<float>* positives);
// A finished assignment as the wire response.
void ToWireBatches(const BatchAssignment& a, size_t num_examples, double seconds,
                   v1::AssignBatchesResponse* out);
// A batch job's state; `result` when done and OK, `status` when failed.
void ToWireBatchJob(bool done, const absl::Status& status, double progress,
                    const v1::AssignBatchesResponse& result, v1::GetBatchJobResponse* out);

// The collection a request names: empty means "default". Checks the
// character set and length.
absl::StatusOr<std::string> CollectionName(const std::string& name);

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_WIRE_H_
