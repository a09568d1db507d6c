// The wire boundary: Matrix decoding, dtype conversion, params mapping.
#include "server/wire.h"

#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine::server {
namespace {

using ::negmine::testing::IsOk;
using ::negmine::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

v1::Matrix Make(uint32_t rows, uint32_t cols, v1::DType dtype, const void* data,
                size_t bytes) {
  v1::Matrix m;
  m.set_rows(rows);
  m.set_cols(cols);
  m.set_dtype(dtype);
  m.set_data(static_cast<const char*>(data), bytes);
  return m;
}

TEST(WireTest, DecodesEveryDtype) {
  const float f[4] = {1.0f, -2.5f, 0.0f, 65504.0f};
  EXPECT_THAT(DecodeMatrix(Make(2, 2, v1::DTYPE_FLOAT32, f, 16), "q", 2),
              ::negmine::testing::IsOkAndHolds(ElementsAre(1.0f, -2.5f, 0.0f, 65504.0f)));
  uint16_t h[4], b[4];
  for (int i = 0; i < 4; ++i) {
    h[i] = FloatToHalf(f[i]);
    b[i] = FloatToBFloat16(f[i]);
  }
  EXPECT_THAT(DecodeMatrix(Make(2, 2, v1::DTYPE_FLOAT16, h, 8), "q", 2),
              ::negmine::testing::IsOkAndHolds(ElementsAre(1.0f, -2.5f, 0.0f, 65504.0f)));
  // bfloat16 keeps 8 mantissa bits: 65504 rounds to 65536.
  EXPECT_THAT(DecodeMatrix(Make(2, 2, v1::DTYPE_BFLOAT16, b, 8), "q", 2),
              ::negmine::testing::IsOkAndHolds(ElementsAre(1.0f, -2.5f, 0.0f, 65536.0f)));
}

TEST(WireTest, HalfConversionRoundTripsEveryFiniteHalf) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = HalfToFloat(h);
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToHalf(f), h) << "half bits " << bits;
  }
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), FloatToHalf(1.0f));  // ties to even
}

TEST(WireTest, RejectsMalformedMatricesNamingTheField) {
  const float f[4] = {};
  EXPECT_THAT(DecodeMatrix(Make(2, 2, v1::DTYPE_UNSPECIFIED, f, 16), "queries", 2),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries.dtype = 0")));
  EXPECT_THAT(DecodeMatrix(Make(2, 2, v1::DTYPE_FLOAT32, f, 15), "queries", 2),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("queries.data has 15 bytes; rows 2 x cols 2 x 4 bytes = 16")));
  EXPECT_THAT(DecodeMatrix(Make(0, 2, v1::DTYPE_FLOAT32, f, 0), "queries", 2),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries.rows = 0")));
  EXPECT_THAT(DecodeMatrix(Make(1, 4, v1::DTYPE_FLOAT32, f, 16), "vectors", 2),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("vectors.cols = 4 does not match the collection's dim = 2")));
}

TEST(WireTest, ParamsAndConfigMapping) {
  v1::MineParams p;
  EXPECT_THAT(ToSearchParams(p).status(), IsOk());
  EXPECT_EQ(ToSearchParams(p)->mode, MineMode::kTopK);
  p.set_mode(v1::MINE_MODE_MIXED);
  p.set_k(9);
  p.set_num_hard(4);
  p.set_temperature(0.1f);
  p.set_rank_offset(2);
  p.set_with_replacement(true);
  auto s = ToSearchParams(p);
  ASSERT_THAT(s.status(), IsOk());
  EXPECT_EQ(s->mode, MineMode::kMixed);
  EXPECT_EQ(s->k, 9);
  EXPECT_EQ(s->num_hard, 4);
  EXPECT_EQ(s->rank_offset, 2);
  EXPECT_TRUE(s->with_replacement);
  p.set_mode(static_cast<v1::MineMode>(42));
  EXPECT_THAT(ToSearchParams(p), StatusIs(absl::StatusCode::kInvalidArgument,
                                          HasSubstr("params.mode = 42")));
  v1::CollectionConfig c;
  c.set_dim(16);
  c.set_metric(static_cast<v1::Metric>(5));
  EXPECT_THAT(ToIndexOptions(c), StatusIs(absl::StatusCode::kInvalidArgument,
                                          HasSubstr("config.metric = 5")));
  EXPECT_THAT(CollectionName(""), ::negmine::testing::IsOkAndHolds("default"));
  EXPECT_THAT(CollectionName("a/b"), StatusIs(absl::StatusCode::kInvalidArgument,
                                              HasSubstr("'a/b'")));
}

}  // namespace
}  // namespace negmine::server
