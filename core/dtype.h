// Conversions between float32 and the 16-bit element types of the wire
// (IEEE binary16 and bfloat16). Exact where the target type can represent
// the value; float32 -> 16 bits rounds to nearest even.
//
// Thread safety: pure functions.
#ifndef NEGMINE_CORE_DTYPE_H_
#define NEGMINE_CORE_DTYPE_H_

#include <cstdint>

namespace negmine {

float HalfToFloat(uint16_t h);
float BFloat16ToFloat(uint16_t b);
uint16_t FloatToHalf(float f);
uint16_t FloatToBFloat16(float f);

}  // namespace negmine

#endif  // NEGMINE_CORE_DTYPE_H_
