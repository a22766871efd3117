/* Lifeline robust mutex: see lifeline.h. */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include "lifeline.h"

_Static_assert(sizeof(pthread_mutex_t) <= SHMQ_LIFELINE_BYTES, "a mutex fits the lifeline page");

int shmq_lifeline_init(void *mem)
{
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (!rc)
        rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (!rc)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (!rc) {
        memset(mem, 0, sizeof(pthread_mutex_t));
        rc = pthread_mutex_init((pthread_mutex_t *)mem, &attr);
    }
    pthread_mutexattr_destroy(&attr);
    return -rc;
}

int shmq_lifeline_hold(void *mem)
{
    pthread_mutex_t *m = (pthread_mutex_t *)mem;
    int rc = pthread_mutex_lock(m);
    if (rc == EOWNERDEAD)
        rc = pthread_mutex_consistent(m);
    return -rc;
}

int shmq_lifeline_watch(void *mem, int64_t timeout_ns)
{
    pthread_mutex_t *m = (pthread_mutex_t *)mem;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (timeout_ns < 0)
        timeout_ns = 0;
    ts.tv_sec += timeout_ns / 1000000000LL;
    ts.tv_nsec += timeout_ns % 1000000000LL;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    int rc = pthread_mutex_timedlock(m, &ts);
    if (rc == ETIMEDOUT)
        return SHMQ_LIFELINE_HELD;
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        pthread_mutex_unlock(m);
        return SHMQ_LIFELINE_DEAD;
    }
    if (rc)
        return -rc;
    pthread_mutex_unlock(m);
    return SHMQ_LIFELINE_FREE;
}
