// Host test program for the __host__ __device__ functions of native/: built with nvcc by
// loader_plugins/tests/test_native.py, which feeds it bit patterns and compares its output with
// PyTorch's CPU conversions. Only kernel launches need a GPU; this checks everything else.
//
//   host_convert_test convert SRC DST IN OUT
//       SRC in {bf16, f16, f32, e4m3fn, e5m2, e4m3fnuz, e5m2fnuz}, DST in {bf16, f16, f32}:
//       reads IN as raw SRC elements, writes OUT as raw DST elements.
//   host_convert_test strided ESIZE ROWS COLS IN_PITCH C0 OUT_PITCH IN OUT
//       copies the column block like lp_strided_copy_<ESIZE> (OUT has ROWS * OUT_PITCH elements,
//       zero where the block does not write).

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "../convert.cuh"
#include "../strided_copy.cu"

static std::vector<unsigned char> read_all(const char* path) {
    std::vector<unsigned char> data;
    FILE* f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(2);
    }
    unsigned char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + n);
    fclose(f);
    return data;
}

static void write_all(const char* path, const std::vector<unsigned char>& data) {
    FILE* f = fopen(path, "wb");
    if (!f || fwrite(data.data(), 1, data.size(), f) != data.size()) {
        perror(path);
        exit(2);
    }
    fclose(f);
}

static int src_size(const char* name) {
    if (!strcmp(name, "f32")) return 4;
    if (!strcmp(name, "bf16") || !strcmp(name, "f16")) return 2;
    if (!strcmp(name, "e4m3fn") || !strcmp(name, "e5m2") || !strcmp(name, "e4m3fnuz") ||
        !strcmp(name, "e5m2fnuz"))
        return 1;
    return 0;
}

static lp_u32 decode(const char* src, const unsigned char* p) {
    lp_u32 v = 0;
    memcpy(&v, p, (size_t)src_size(src));  // little-endian host
    if (!strcmp(src, "f32")) return lp_f32_from_f32(v);
    if (!strcmp(src, "bf16")) return lp_f32_from_bf16((lp_u16)v);
    if (!strcmp(src, "f16")) return lp_f32_from_f16((lp_u16)v);
    if (!strcmp(src, "e4m3fn")) return lp_f32_from_e4m3fn((lp_u8)v);
    if (!strcmp(src, "e5m2")) return lp_f32_from_e5m2((lp_u8)v);
    if (!strcmp(src, "e4m3fnuz")) return lp_f32_from_e4m3fnuz((lp_u8)v);
    return lp_f32_from_e5m2fnuz((lp_u8)v);
}

static int convert(const char* src, const char* dst, const char* in_path, const char* out_path) {
    int ssize = src_size(src);
    int dsize = !strcmp(dst, "f32") ? 4 : (!strcmp(dst, "bf16") || !strcmp(dst, "f16")) ? 2 : 0;
    if (!ssize || !dsize || !strcmp(src, dst)) {
        fprintf(stderr, "unsupported conversion %s -> %s\n", src, dst);
        return 2;
    }
    std::vector<unsigned char> in = read_all(in_path);
    size_t n = in.size() / (size_t)ssize;
    std::vector<unsigned char> out(n * (size_t)dsize);
    for (size_t i = 0; i < n; ++i) {
        lp_u32 f = decode(src, &in[i * (size_t)ssize]);
        if (dsize == 4) {
            lp_u32 v = lp_f32_to_f32(f);
            memcpy(&out[i * 4], &v, 4);
        } else {
            lp_u16 v = !strcmp(dst, "bf16") ? lp_f32_to_bf16(f) : lp_f32_to_f16(f);
            memcpy(&out[i * 2], &v, 2);
        }
    }
    write_all(out_path, out);
    return 0;
}

static int strided(char** argv) {
    lp_sc_u64 esize = strtoull(argv[0], 0, 10), rows = strtoull(argv[1], 0, 10),
              cols = strtoull(argv[2], 0, 10), in_pitch = strtoull(argv[3], 0, 10),
              c0 = strtoull(argv[4], 0, 10), out_pitch = strtoull(argv[5], 0, 10);
    std::vector<unsigned char> in = read_all(argv[6]);
    if (in.size() < rows * in_pitch * esize || c0 + cols > in_pitch || cols > out_pitch) {
        fprintf(stderr, "bad strided arguments\n");
        return 2;
    }
    std::vector<unsigned char> out(rows * out_pitch * esize, 0);
    for (lp_sc_u64 r = 0; r < rows; ++r) {
        for (lp_sc_u64 c = 0; c < cols; ++c) {
            lp_sc_u64 i, o;
            lp_strided_offsets(r, c, in_pitch, c0, out_pitch, &i, &o);
            memcpy(&out[o * esize], &in[i * esize], esize);
        }
    }
    write_all(argv[7], out);
    return 0;
}

int main(int argc, char** argv) {
    if (argc == 6 && !strcmp(argv[1], "convert")) return convert(argv[2], argv[3], argv[4], argv[5]);
    if (argc == 10 && !strcmp(argv[1], "strided")) return strided(argv + 2);
    fprintf(stderr,
            "usage: %s convert SRC DST IN OUT\n"
            "       %s strided ESIZE ROWS COLS IN_PITCH C0 OUT_PITCH IN OUT\n",
            argv[0], argv[0]);
    return 2;
}
