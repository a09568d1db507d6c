#include "core/dtype.h"

#include <cmath>
#include <cstring>

namespace negmine {
namespace {

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

}  // namespace

float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return FromBits(sign | 0x7f800000u | (mant << 13));  // Inf/NaN
  if (exp != 0) return FromBits(sign | ((exp + 112) << 23) | (mant << 13));
  if (mant == 0) return FromBits(sign);  // signed zero
  // A subnormal half: normalize it into a float32 normal.
  exp = 113;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --exp;
  }
  return FromBits(sign | (exp << 23) | ((mant & 0x3ffu) << 13));
}

float BFloat16ToFloat(uint16_t b) { return FromBits(uint32_t{b} << 16); }

uint16_t FloatToHalf(float f) {
  const uint32_t b = Bits(f);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  if (std::isnan(f)) return sign | 0x7e00u;
  const float a = std::fabs(f);
  if (a >= 65520.0f) return sign | 0x7c00u;  // rounds to Inf
  if (a < 0x1p-24f / 2) return sign;          // rounds to zero
  if (a < 0x1p-14f) {
    // Subnormal: a multiple of 2^-24, rounded to nearest even.
    return sign | static_cast<uint16_t>(std::nearbyint(a * 0x1p24f));
  }
  const uint32_t e = ((b >> 23) & 0xff) - 112;
  uint32_t m = b & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13);
  const uint32_t rest = m & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;  // may carry into exp
  return sign | static_cast<uint16_t>(h);
}

uint16_t FloatToBFloat16(float f) {
  const uint32_t b = Bits(f);
  if (std::isnan(f)) return static_cast<uint16_t>((b >> 16) | 0x40u);
  const uint32_t rounded = b + 0x7fffu + ((b >> 16) & 1);
  return static_cast<uint16_t>(rounded >> 16);
}

}  // namespace negmine
