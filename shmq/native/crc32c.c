/*
 * CRC32C (Castagnoli): reflected polynomial 0x82F63B78, initial value and
 * final xor 0xFFFFFFFF. Same answers as Kafka's Crc32C and the crc32c
 * libraries: shmq_crc32c(0, "123456789", 9) == 0xE3069283.
 *
 * The crc argument is a previous result (0 to start), so a checksum can be
 * computed piecewise: crc(a + b) == shmq_crc32c(shmq_crc32c(0, a), b).
 *
 * Two implementations with identical answers:
 *   - hardware: the SSE4.2 crc32 instruction, 8 bytes per step (x86 only),
 *     on three streams at once for long buffers (the instruction takes 3
 *     cycles but issues one per cycle), joined with shift tables;
 *   - portable: slicing-by-8 tables, 8 bytes per step.
 * shmq_crc32c picks one at run time (CPUID, checked once and cached).
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "record_batch.h"

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define SHMQ_CRC_X86 1
#else
#define SHMQ_CRC_X86 0
#endif

#define CRC32C_POLY 0x82F63B78u

/* ---- portable slicing-by-8 ------------------------------------------- */

/* table[k][b]: CRC of byte b followed by k zero bytes. Filled once at load. */
static uint32_t crc_table[8][256];

static void crc32c_init_shift_tables(void); /* needs crc_table: called after it is filled */

__attribute__((constructor))
static void crc32c_init_tables(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int i = 0; i < 8; i++)
            c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
        crc_table[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++)
        for (int k = 1; k < 8; k++)
            crc_table[k][b] = (crc_table[k - 1][b] >> 8) ^ crc_table[0][crc_table[k - 1][b] & 0xff];
    crc32c_init_shift_tables();
}

/* Load 8 bytes as a little-endian integer (any alignment). */
static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

uint32_t shmq_crc32c_portable(uint32_t crc, const uint8_t *buf, size_t len)
{
    uint32_t c = ~crc;

    while (len >= 8) {
        uint64_t w = load_le64(buf) ^ c;
        c = crc_table[7][w & 0xff] ^
            crc_table[6][(w >> 8) & 0xff] ^
            crc_table[5][(w >> 16) & 0xff] ^
            crc_table[4][(w >> 24) & 0xff] ^
            crc_table[3][(w >> 32) & 0xff] ^
            crc_table[2][(w >> 40) & 0xff] ^
            crc_table[1][(w >> 48) & 0xff] ^
            crc_table[0][w >> 56];
        buf += 8;
        len -= 8;
    }
    while (len--)
        c = (c >> 8) ^ crc_table[0][(c ^ *buf++) & 0xff];
    return ~c;
}

/* ---- joining CRCs of consecutive blocks --------------------------------
 *
 * On the raw register (no pre/post inversion) a CRC is linear: the register
 * after A || B, started from r, is shift(crc_A(r), |B|) ^ crc_B(0), where
 * shift(c, n) is the register after n zero bytes started from c. shift by a
 * fixed n is a 32x32 bit matrix, kept as four byte-indexed tables. */

#define CRC_SHORT 256   /* bytes per stream, buffers of 768 bytes or more */
#define CRC_LONG 8192   /* bytes per stream, buffers of 24 KiB or more */

static uint32_t shift_short[4][256], shift_long[4][256];

static void make_shift_table(uint32_t t[4][256], size_t n)
{
    static const uint8_t zeros[CRC_LONG];
    uint32_t basis[32]; /* shift(1 << i, n) */
    for (int i = 0; i < 32; i++)
        basis[i] = ~shmq_crc32c_portable(~(1u << i), zeros, n);
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int j = 0; j < 8; j++)
                if (b >> j & 1)
                    v ^= basis[8 * k + j];
            t[k][b] = v;
        }
}

static void crc32c_init_shift_tables(void)
{
    make_shift_table(shift_short, CRC_SHORT);
    make_shift_table(shift_long, CRC_LONG);
}

static inline uint32_t crc_shift(uint32_t t[4][256], uint32_t c)
{
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
}

/* ---- SSE4.2 ----------------------------------------------------------- */

#if SHMQ_CRC_X86 && defined(__x86_64__)
/* Three streams of `block` bytes each from buf; returns the raw register
 * after all 3 * block bytes, started from c. */
__attribute__((target("sse4.2")))
static inline uint64_t crc32c_3way(uint64_t c, const uint8_t *buf, size_t block, uint32_t t[4][256])
{
    uint64_t c1 = 0, c2 = 0;
    for (size_t i = 0; i < block; i += 8) {
        uint64_t w0, w1, w2;
        memcpy(&w0, buf + i, 8);
        memcpy(&w1, buf + block + i, 8);
        memcpy(&w2, buf + 2 * block + i, 8);
        c = _mm_crc32_u64(c, w0);
        c1 = _mm_crc32_u64(c1, w1);
        c2 = _mm_crc32_u64(c2, w2);
    }
    c = crc_shift(t, (uint32_t)c) ^ (uint32_t)c1;
    return crc_shift(t, (uint32_t)c) ^ (uint32_t)c2;
}
#endif

#if SHMQ_CRC_X86
__attribute__((target("sse4.2")))
static uint32_t crc32c_sse42(uint32_t crc, const uint8_t *buf, size_t len)
{
#if defined(__x86_64__)
    uint64_t c = (uint32_t)~crc;
    while (len >= 3 * CRC_LONG) {
        c = crc32c_3way(c, buf, CRC_LONG, shift_long);
        buf += 3 * CRC_LONG;
        len -= 3 * CRC_LONG;
    }
    while (len >= 3 * CRC_SHORT) {
        c = crc32c_3way(c, buf, CRC_SHORT, shift_short);
        buf += 3 * CRC_SHORT;
        len -= 3 * CRC_SHORT;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, buf, 8);
        c = _mm_crc32_u64(c, w);
        buf += 8;
        len -= 8;
    }
    uint32_t c32 = (uint32_t)c;
#else
    uint32_t c32 = ~crc;
#endif
    while (len >= 4) {
        uint32_t w;
        memcpy(&w, buf, 4);
        c32 = _mm_crc32_u32(c32, w);
        buf += 4;
        len -= 4;
    }
    while (len--)
        c32 = _mm_crc32_u8(c32, *buf++);
    return ~c32;
}
#endif

/* 1 if the SSE4.2 path is used; decided on first use and cached. */
int shmq_crc32c_hardware_available(void)
{
#if SHMQ_CRC_X86
    static int cached = -1;
    int hw = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (hw < 0) {
        __builtin_cpu_init();
        hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
        __atomic_store_n(&cached, hw, __ATOMIC_RELAXED);
    }
    return hw;
#else
    return 0;
#endif
}

uint32_t shmq_crc32c(uint32_t crc, const uint8_t *buf, size_t len)
{
#if SHMQ_CRC_X86
    if (shmq_crc32c_hardware_available())
        return crc32c_sse42(crc, buf, len);
#endif
    return shmq_crc32c_portable(crc, buf, len);
}
