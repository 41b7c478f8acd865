// Per-element floating-point conversions on bit patterns, bit-exact with PyTorch's CPU casts.
//
// Every function takes and returns raw bits (no float arithmetic at all), so the result is the
// same on the host and on the device, whatever the compiler's contraction or flush-to-zero
// settings. Conversions go through float32, as PyTorch's do: decoding any of the source
// formats into float32 is exact, so each conversion rounds once, to nearest even.
//
// NaN: float32 -> bfloat16 gives 0x7FC0 and float32 -> float16 gives sign | 0x7E00 (c10's scalar
// conversions); decoding a NaN into float32 keeps its sign and sets the quiet bit. PyTorch's own
// NaN bit patterns differ between its scalar, vectorised (AVX) and CUDA paths, so tests compare
// NaN results by NaN-ness and every other result bit for bit.
//
// Compiled three ways: by NVRTC (cupy.RawModule, this header pasted in front of the kernels), by
// nvcc (the host test program in native/tests/) and, without __CUDACC__, by a plain C++ compiler.

#ifndef LOADER_PLUGINS_CONVERT_CUH
#define LOADER_PLUGINS_CONVERT_CUH

#if defined(__CUDACC__)
#define LP_HD __host__ __device__ __forceinline__
#else
#define LP_HD static inline
#endif

// Own names: NVRTC has no <stdint.h> by default.
typedef unsigned char lp_u8;
typedef unsigned short lp_u16;
typedef unsigned int lp_u32;
typedef unsigned long long lp_u64;

// ---- decode to float32 bits (exact) ------------------------------------------------------

LP_HD lp_u32 lp_f32_from_f32(lp_u32 x) { return x; }

LP_HD lp_u32 lp_f32_from_bf16(lp_u16 h) { return ((lp_u32)h) << 16; }

LP_HD lp_u32 lp_f32_from_f16(lp_u16 h) {
    lp_u32 sign = ((lp_u32)(h & 0x8000u)) << 16;
    lp_u32 exp = (h >> 10) & 0x1fu;
    lp_u32 man = h & 0x3ffu;
    if (exp == 0x1fu) {
        if (man == 0) return sign | 0x7f800000u;        // infinity
        return sign | 0x7fc00000u | (man << 13);         // NaN, quieted, payload kept
    }
    if (exp == 0) {
        if (man == 0) return sign;                       // signed zero
        int e = 1;                                       // subnormal: normalise
        while (!(man & 0x400u)) {
            man <<= 1;
            --e;
        }
        man &= 0x3ffu;
        return sign | ((lp_u32)(e + 112) << 23) | (man << 13);
    }
    return sign | ((exp + 112u) << 23) | (man << 13);
}

// float8 e4m3fn: bias 7, no infinities, NaN = S.1111.111.
LP_HD lp_u32 lp_f32_from_e4m3fn(lp_u8 b) {
    lp_u32 sign = ((lp_u32)(b & 0x80u)) << 24;
    lp_u32 exp = (b >> 3) & 0xfu;
    lp_u32 man = b & 0x7u;
    if ((b & 0x7fu) == 0x7fu) return sign | 0x7fc00000u;
    if (exp == 0) {
        if (man == 0) return sign;
        int e = 1;
        while (!(man & 0x8u)) {
            man <<= 1;
            --e;
        }
        man &= 0x7u;
        return sign | ((lp_u32)(e + 120) << 23) | (man << 20);
    }
    return sign | ((exp + 120u) << 23) | (man << 20);
}

// float8 e5m2: the upper byte of a float16.
LP_HD lp_u32 lp_f32_from_e5m2(lp_u8 b) { return lp_f32_from_f16((lp_u16)(((lp_u32)b) << 8)); }

// float8 e4m3fnuz: bias 8, no infinities, no negative zero, NaN = 0x80 only.
LP_HD lp_u32 lp_f32_from_e4m3fnuz(lp_u8 b) {
    if (b == 0x80u) return 0x7fc00000u;
    lp_u32 sign = ((lp_u32)(b & 0x80u)) << 24;
    lp_u32 exp = (b >> 3) & 0xfu;
    lp_u32 man = b & 0x7u;
    if (exp == 0) {
        if (man == 0) return 0;
        int e = 1;
        while (!(man & 0x8u)) {
            man <<= 1;
            --e;
        }
        man &= 0x7u;
        return sign | ((lp_u32)(e + 119) << 23) | (man << 20);
    }
    return sign | ((exp + 119u) << 23) | (man << 20);
}

// float8 e5m2fnuz: bias 16, no infinities, no negative zero, NaN = 0x80 only.
LP_HD lp_u32 lp_f32_from_e5m2fnuz(lp_u8 b) {
    if (b == 0x80u) return 0x7fc00000u;
    lp_u32 sign = ((lp_u32)(b & 0x80u)) << 24;
    lp_u32 exp = (b >> 2) & 0x1fu;
    lp_u32 man = b & 0x3u;
    if (exp == 0) {
        if (man == 0) return 0;
        int e = 1;
        while (!(man & 0x4u)) {
            man <<= 1;
            --e;
        }
        man &= 0x3u;
        return sign | ((lp_u32)(e + 111) << 23) | (man << 21);
    }
    return sign | ((exp + 111u) << 23) | (man << 21);
}

// ---- encode float32 bits (round to nearest, ties to even) --------------------------------

LP_HD lp_u32 lp_f32_to_f32(lp_u32 x) { return x; }

LP_HD lp_u16 lp_f32_to_bf16(lp_u32 x) {
    if ((x & 0x7fffffffu) > 0x7f800000u) return (lp_u16)0x7fc0u;
    return (lp_u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

LP_HD lp_u16 lp_f32_to_f16(lp_u32 x) {
    lp_u32 sign = (x >> 16) & 0x8000u;
    lp_u32 a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (lp_u16)(sign | 0x7e00u);      // NaN
    if (a >= 0x477ff000u) return (lp_u16)(sign | 0x7c00u);     // >= 65520 rounds to infinity
    if (a >= 0x38800000u) {                                    // >= 2^-14: a normal float16
        lp_u32 h = ((a >> 23) - 112u) << 10 | ((a >> 13) & 0x3ffu);
        lp_u32 rem = a & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h; // a carry into the exponent is right
        return (lp_u16)(sign | h);
    }
    if (a <= 0x33000000u) return (lp_u16)sign;                 // <= 2^-25 rounds to zero
    // subnormal float16: units of 2^-24; the float32 value is (1.man) * 2^(e), e in [-25, -15]
    lp_u32 man = (a & 0x7fffffu) | 0x800000u;
    lp_u32 shift = 126u - (a >> 23);                           // = -(e + 1), from 14 to 24
    lp_u32 h = man >> shift;
    lp_u32 rem = man & ((1u << shift) - 1u);
    lp_u32 halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return (lp_u16)(sign | h);
}

#endif  // LOADER_PLUGINS_CONVERT_CUH
