// Stand-in for CUDA's cuda_fp16.h in the emulator (tests/cuda_emu): IEEE binary16 storage and
// its conversion to float.
#pragma once
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
