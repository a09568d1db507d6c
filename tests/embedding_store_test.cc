#include "core/store/embedding_store.h"

#include <vector>

#include "gtest/gtest.h"

namespace negmine {
namespace {

TEST(EmbeddingStoreTest, UpsertGetOverwrite) {
  EmbeddingStore store(2);
  store.Upsert({10, 20}, {1, 2, 3, 4}, /*model_step=*/5);
  ASSERT_EQ(store.size(), 2u);
  const size_t r20 = *store.Row(20);
  EXPECT_EQ(store.vector(r20)[0], 3);
  EXPECT_EQ(store.model_step(r20), 5);

  store.Upsert({20}, {7, 8}, 9);  // overwrite keeps the row
  EXPECT_EQ(store.size(), 2u);
  EXPECT_EQ(*store.Row(20), r20);
  EXPECT_EQ(store.vector(r20)[1], 8);
  EXPECT_EQ(store.model_step(r20), 9);
  EXPECT_FALSE(store.Row(30).has_value());
}

TEST(EmbeddingStoreTest, DeleteFreesRowForReuse) {
  EmbeddingStore store(1);
  store.Upsert({1, 2, 3}, {1, 2, 3}, 0);
  const size_t r2 = *store.Row(2);
  EXPECT_TRUE(store.Delete(2));
  EXPECT_FALSE(store.Delete(2));
  EXPECT_FALSE(store.live(r2));
  EXPECT_EQ(store.size(), 2u);

  store.Upsert({4}, {4}, 0);
  EXPECT_EQ(*store.Row(4), r2);  // the freed row is reused
  EXPECT_EQ(store.num_rows(), 3u);
  EXPECT_TRUE(store.live(r2));
  EXPECT_EQ(store.id(r2), 4u);
}

}  // namespace
}  // namespace negmine
