// Column-block copy on the device: a tensor-parallel shard along dim >= 1 of a row-major tensor.
//
//   out[r * out_pitch + c] = in[r * in_pitch + c0 + c]     for r < rows, c < cols
//
// Pitches and c0 are in elements. A tensor of shape (d0, ..., dk) sliced along dim d is the
// column block of the [prod(d0..d(d-1)), prod(dd..dk)] matrix with c0 = start * prod(d(d+1)..dk)
// and cols = length * prod(d(d+1)..dk); a contiguous destination has out_pitch = cols.
// Used where cudaMemcpy2DAsync does not fit: after the whole chunk crossed PCIe in one linear
// copy (narrow 2D host-to-device copies are slow), and in front of a dtype conversion.
//
// Kernels: lp_strided_copy_{1,2,4,8} by element size. Launch with a 2D grid: x over columns,
// y over rows (both grid-stride loops, so any grid size is correct).

#if defined(__CUDACC__)
#define LP_SC_HD __host__ __device__ __forceinline__
#else
#define LP_SC_HD static inline
#endif

typedef unsigned long long lp_sc_u64;

// Element offsets of one (row, column) pair of the block; the host test checks these.
LP_SC_HD void lp_strided_offsets(lp_sc_u64 r, lp_sc_u64 c, lp_sc_u64 in_pitch, lp_sc_u64 c0,
                                 lp_sc_u64 out_pitch, lp_sc_u64* in_index, lp_sc_u64* out_index) {
    *in_index = r * in_pitch + c0 + c;
    *out_index = r * out_pitch + c;
}

#if defined(__CUDACC__)
template <typename T>
__device__ __forceinline__ void lp_strided_copy(const T* __restrict__ in, T* __restrict__ out,
                                                lp_sc_u64 rows, lp_sc_u64 cols, lp_sc_u64 in_pitch,
                                                lp_sc_u64 c0, lp_sc_u64 out_pitch) {
    lp_sc_u64 col_stride = (lp_sc_u64)blockDim.x * gridDim.x;
    for (lp_sc_u64 r = blockIdx.y; r < rows; r += gridDim.y) {
        for (lp_sc_u64 c = (lp_sc_u64)blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += col_stride) {
            lp_sc_u64 i, o;
            lp_strided_offsets(r, c, in_pitch, c0, out_pitch, &i, &o);
            out[o] = in[i];
        }
    }
}

#define LP_STRIDED_KERNEL(SIZE, T)                                                                     \
    extern "C" __global__ void lp_strided_copy_##SIZE(const T* __restrict__ in, T* __restrict__ out, \
                                                      lp_sc_u64 rows, lp_sc_u64 cols,                \
                                                      lp_sc_u64 in_pitch, lp_sc_u64 c0,              \
                                                      lp_sc_u64 out_pitch) {                         \
        lp_strided_copy<T>(in, out, rows, cols, in_pitch, c0, out_pitch);                             \
    }

LP_STRIDED_KERNEL(1, unsigned char)
LP_STRIDED_KERNEL(2, unsigned short)
LP_STRIDED_KERNEL(4, unsigned int)
LP_STRIDED_KERNEL(8, unsigned long long)
#endif
