// .npy and .fvecs reading and writing, against files written by hand.
#include "client/npy.h"

#include <cstdio>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine::client {
namespace {

using ::negmine::testing::IsOk;
using ::negmine::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/" + name;
}

void WriteRaw(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// A version-1 .npy header as numpy writes it.
std::string Npy(const std::string& dict, const std::string& data) {
  std::string h = dict;
  while ((10 + h.size() + 1) % 64 != 0) h += ' ';
  h += '\n';
  std::string out = "\x93NUMPY\x01";
  out += '\0';
  out += static_cast<char>(h.size() & 0xff);
  out += static_cast<char>(h.size() >> 8);
  return out + h + data;
}

TEST(NpyTest, SaveLoadRoundTrip) {
  const std::string path = TempPath("rt.npy");
  ASSERT_THAT(SaveNpy(path, 2, 3, std::vector<float>{1, 2, 3, 4, 5, 6}), IsOk());
  auto a = LoadNpyFloat(path);
  ASSERT_THAT(a.status(), IsOk());
  EXPECT_EQ(a->rows, 2u);
  EXPECT_EQ(a->cols, 3u);
  EXPECT_THAT(a->data, ElementsAre(1, 2, 3, 4, 5, 6));
  ASSERT_THAT(SaveNpy(path, 1, 2, std::vector<uint64_t>{7, 1ull << 40}), IsOk());
  auto ids = LoadNpyInt(path);
  ASSERT_THAT(ids.status(), IsOk());
  EXPECT_THAT(ids->data, ElementsAre(7, 1ll << 40));
}

TEST(NpyTest, ReadsFloat16And1D) {
  const std::string path = TempPath("h.npy");
  const uint16_t h[3] = {0x3c00, 0xc000, 0x3800};  // 1, -2, 0.5
  WriteRaw(path, Npy("{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }",
                     std::string(reinterpret_cast<const char*>(h), 6)));
  auto a = LoadNpyFloat(path);
  ASSERT_THAT(a.status(), IsOk());
  EXPECT_EQ(a->rows, 3u);
  EXPECT_EQ(a->cols, 1u);
  EXPECT_THAT(a->data, ElementsAre(1.0f, -2.0f, 0.5f));
}

TEST(NpyTest, RejectsWhatItCannotRead) {
  const std::string path = TempPath("bad.npy");
  WriteRaw(path, Npy("{'descr': '<f4', 'fortran_order': True, 'shape': (1, 1), }",
                     std::string(4, '\0')));
  EXPECT_THAT(LoadNpyFloat(path), StatusIs(absl::StatusCode::kInvalidArgument,
                                           HasSubstr("Fortran order")));
  WriteRaw(path, Npy("{'descr': '<i2', 'fortran_order': False, 'shape': (1,), }",
                     std::string(2, '\0')));
  EXPECT_THAT(LoadNpyFloat(path), StatusIs(absl::StatusCode::kInvalidArgument,
                                           HasSubstr("dtype '<i2'")));
  WriteRaw(path, Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 1), }",
                     std::string(8, '\0')));
  EXPECT_THAT(LoadNpyFloat(path), StatusIs(absl::StatusCode::kInvalidArgument,
                                           HasSubstr("truncated")));
  WriteRaw(path, "not numpy at all");
  EXPECT_THAT(LoadNpyFloat(path), StatusIs(absl::StatusCode::kInvalidArgument,
                                           HasSubstr("not an .npy")));
  EXPECT_THAT(LoadNpyFloat(TempPath("missing.npy")),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("missing.npy")));
}

// Ids: uint64 arrays keep every value (2^63 and above); signed arrays map
// negative entries to padding or refuse them, as the caller asks.
TEST(NpyTest, IdsAreUint64) {
  const std::string path = TempPath("ids.npy");
  const uint64_t big = (uint64_t{1} << 63) + 12345;
  ASSERT_THAT(SaveNpy(path, 1, 3, std::vector<uint64_t>{big, 7, kPaddingId}), IsOk());
  for (NegativeIds policy : {NegativeIds::kError, NegativeIds::kPadding}) {
    auto ids = LoadNpyIds(path, policy, "--ids");
    ASSERT_THAT(ids.status(), IsOk());
    EXPECT_EQ(ids->rows, 1u);
    EXPECT_EQ(ids->cols, 3u);
    EXPECT_THAT(ids->data, ElementsAre(big, 7u, kPaddingId));
  }
  const int64_t signed_ids[4] = {5, -1, 1ll << 40, -7};
  WriteRaw(path, Npy("{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }",
                     std::string(reinterpret_cast<const char*>(signed_ids), 32)));
  auto padded = LoadNpyIds(path, NegativeIds::kPadding, "--exclude");
  ASSERT_THAT(padded.status(), IsOk());
  EXPECT_THAT(padded->data, ElementsAre(5u, kPaddingId, uint64_t{1} << 40, kPaddingId));
  EXPECT_THAT(LoadNpyIds(path, NegativeIds::kError, "--ids"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("--ids: " + path + " holds the negative id -1 (row 0, column 1)")));
  const int32_t small[2] = {3, 4};
  WriteRaw(path, Npy("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }",
                     std::string(reinterpret_cast<const char*>(small), 8)));
  auto narrow = LoadNpyIds(path, NegativeIds::kError, "--ids");
  ASSERT_THAT(narrow.status(), IsOk());
  EXPECT_THAT(narrow->data, ElementsAre(3u, 4u));
  WriteRaw(path, Npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
                     std::string(4, '\0')));
  EXPECT_THAT(LoadNpyIds(path, NegativeIds::kError, "--ids"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expected integer ids")));
}

TEST(NpyTest, SavesFloat64) {
  const std::string path = TempPath("f8.npy");
  ASSERT_THAT(SaveNpy(path, 1, 2, std::vector<double>{0.25, -3.5}), IsOk());
  auto a = LoadNpyFloat(path);
  ASSERT_THAT(a.status(), IsOk());
  EXPECT_THAT(a->data, ElementsAre(0.25f, -3.5f));
}

TEST(NpyTest, ReadsFvecs) {
  const std::string path = TempPath("x.fvecs");
  std::string bytes;
  for (int v = 0; v < 2; ++v) {
    const int32_t dim = 2;
    const float x[2] = {v + 0.5f, -1.0f * v};
    bytes.append(reinterpret_cast<const char*>(&dim), 4);
    bytes.append(reinterpret_cast<const char*>(x), 8);
  }
  WriteRaw(path, bytes);
  auto a = LoadFvecs(path);
  ASSERT_THAT(a.status(), IsOk());
  EXPECT_EQ(a->rows, 2u);
  EXPECT_EQ(a->cols, 2u);
  EXPECT_THAT(a->data, ElementsAre(0.5f, -0.0f, 1.5f, -1.0f));
  WriteRaw(path, bytes.substr(0, bytes.size() - 2));
  EXPECT_THAT(LoadFvecs(path), StatusIs(absl::StatusCode::kInvalidArgument,
                                        HasSubstr("vector 1 is truncated")));
}

}  // namespace
}  // namespace negmine::client
