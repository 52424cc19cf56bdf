// Stand-in for CUDA's cuda_fp16.h in the emulator (tests/cuda_emu): IEEE binary16 storage and
// its conversion to float.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
    uint16_t bits;
};

inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
    const uint32_t exp = (h.bits >> 10) & 0x1fu;
    const uint32_t man = h.bits & 0x3ffu;
    float f;
    if (exp == 0) {
        f = std::ldexp((float)man, -24);  // zero and subnormals
        return sign ? -f : f;
    }
    uint32_t u;
    if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);  // inf / nan
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, as CUDA's __float2half_rn: overflow to infinity, subnormals and NaN.
inline __half __float2half_rn(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return __half{(uint16_t)(sign | 0x7e00u)};  // NaN
    if (a >= 0x477ff000u) return __half{(uint16_t)(sign | 0x7c00u)};  // >= 65520: infinity
    if (a < 0x38800000u) {
        // Below 2^-14: a subnormal half, man = round(|f| * 2^24), exact in double.
        double scaled;
        float af;
        std::memcpy(&af, &a, 4);
        scaled = (double)af * 16777216.0;
        const double fl = std::floor(scaled);
        double r = fl;
        const double frac = scaled - fl;
        if (frac > 0.5 || (frac == 0.5 && std::fmod(fl, 2.0) != 0.0)) r = fl + 1.0;
        return __half{(uint16_t)(sign | (uint16_t)r)};  // r == 1024 is the smallest normal
    }
    // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
    uint32_t h = ((a >> 23) - 112u) << 10 | ((a >> 13) & 0x3ffu);
    const uint32_t rest = a & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry rolls into the exponent
    return __half{(uint16_t)(sign | h)};
}
