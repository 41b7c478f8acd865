// Device dtype conversion: a checkpoint in one floating-point dtype loads into a model of another
// without a pass over the CPU. Compiled at first use by cupy.RawModule (see
// loader_plugins/core/sinks/cuda.py, which pastes convert.cuh in place of the #include).
//
// Kernel names: lp_convert_<src>_to_<dst>(const src *in, dst *out, n) for
//   src in {bf16, f16, f32, e4m3fn, e5m2, e4m3fnuz, e5m2fnuz}, dst in {bf16, f16, f32}, src != dst.
// A grid-stride loop over n elements; in and out must not overlap.

#include "convert.cuh"

#define LP_CONVERT_KERNEL(SRC, SRC_T, DST, DST_T)                                                  \
    extern "C" __global__ void lp_convert_##SRC##_to_##DST(const SRC_T* __restrict__ in,         \
                                                          DST_T* __restrict__ out, lp_u64 n) {   \
        lp_u64 stride = (lp_u64)blockDim.x * gridDim.x;                                           \
        for (lp_u64 i = (lp_u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {     \
            out[i] = (DST_T)lp_f32_to_##DST(lp_f32_from_##SRC(in[i]));                            \
        }                                                                                          \
    }

#define LP_CONVERT_TO_16(SRC, SRC_T)              \
    LP_CONVERT_KERNEL(SRC, SRC_T, bf16, lp_u16) \
    LP_CONVERT_KERNEL(SRC, SRC_T, f16, lp_u16)  \
    LP_CONVERT_KERNEL(SRC, SRC_T, f32, lp_u32)

LP_CONVERT_KERNEL(bf16, lp_u16, f16, lp_u16)
LP_CONVERT_KERNEL(bf16, lp_u16, f32, lp_u32)
LP_CONVERT_KERNEL(f16, lp_u16, bf16, lp_u16)
LP_CONVERT_KERNEL(f16, lp_u16, f32, lp_u32)
LP_CONVERT_KERNEL(f32, lp_u32, bf16, lp_u16)
LP_CONVERT_KERNEL(f32, lp_u32, f16, lp_u16)
LP_CONVERT_TO_16(e4m3fn, lp_u8)
LP_CONVERT_TO_16(e5m2, lp_u8)
LP_CONVERT_TO_16(e4m3fnuz, lp_u8)
LP_CONVERT_TO_16(e5m2fnuz, lp_u8)
