// AMX's tile configuration, shared by the kernels built at the "amx" level (fused_attention.cpp,
// small_gemm.cpp): all eight tiles 16 rows of 64 bytes (float32 results 16 x 16, bfloat16
// operands 16 x 32, or 16 pairs x 16). fused_attention.build hashes this header with each
// source, so a change here rebuilds both.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace nd_amx {

struct TileConfig {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

inline void configure_tiles() {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

}  // namespace nd_amx
