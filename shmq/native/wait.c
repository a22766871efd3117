/* Blocking wait on a 32-bit word in shared memory: futex on Linux, a short
 * sleep loop elsewhere. The mapping is MAP_SHARED, so the wait must be the
 * process-shared (non-PRIVATE) futex operation. */
#include <errno.h>
#include <time.h>
#include <stdint.h>
#include "log.h"

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <limits.h>
#endif

int64_t shmq_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t shmq_wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t shmq_deadline(int64_t timeout_ns) { return timeout_ns < 0 ? -1 : shmq_now_ns() + timeout_ns; }

/* Returns 0 when woken (or the word already differs), 1 on timeout. */
int shmq_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns)
{
    if (timeout_ns < 0)
        timeout_ns = 0;
#ifdef __linux__
    struct timespec ts = { timeout_ns / 1000000000LL, timeout_ns % 1000000000LL };
    long rc = syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0);
    if (rc == -1 && errno == ETIMEDOUT)
        return 1;
    return 0;
#else
    int64_t step = timeout_ns < 50000 ? timeout_ns : 50000;
    struct timespec ts = { 0, step };
    if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != expected)
        return 0;
    nanosleep(&ts, NULL);
    return __atomic_load_n(word, __ATOMIC_ACQUIRE) == expected && step == timeout_ns;
#endif
}

int shmq_futex_wake(uint32_t *word, int count)
{
#ifdef __linux__
    return (int)syscall(SYS_futex, word, FUTEX_WAKE, count > 0 ? count : INT_MAX, NULL, NULL, 0);
#else
    return 0;
#endif
}
