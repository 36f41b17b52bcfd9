// What the AMX kernels (linear_amx.cpp, paged_prefill_amx.cpp) share: whether this build targets
// AMX (SPINDLE_AMX), asking Linux for the tile state once per process, and the tile palette they
// all use — eight tiles of 16 rows x 64 bytes (A: 16 rows x 32 bf16; B: 16 bf16 pairs x 16
// columns in VNNI order; C: 16 x 16 fp32).
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define SPINDLE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace spindle_amx {

inline bool amx_permitted() {
  static const bool permitted = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023;
    constexpr int XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return permitted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure_tiles() {
  TileConfig config;
  for (int tile = 0; tile < 8; ++tile) {
    config.colsb[tile] = 64;
    config.rows[tile] = 16;
  }
  _tile_loadconfig(&config);
}

}  // namespace spindle_amx

#endif
