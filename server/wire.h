// The one boundary between wire types (negmine.v1 protobufs) and core types.
//
// Every check of a request's shape happens here or in core, and every error
// message names the field and the offending value.
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
#include "core/index.h"
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

// The collection a request names: empty means "default". Checks the
// character set and length.
absl::StatusOr<std::string> CollectionName(const std::string& name);

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_WIRE_H_
