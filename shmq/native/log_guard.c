/*
 * Mapped files that shrink or vanish under a live process.
 *
 * Every file of a log is created at its final size and never changes size
 * (log_files.c). Another process of the user can still truncate, shrink or
 * unlink one while this process has it mapped: a load or store past the new
 * end of a file raises SIGBUS, which would kill the process, and an
 * unlinked or replaced file silently leaves this process alone with the old
 * inode. Both become SHMQ_ERR_STORAGE on the handle of that log, naming the
 * file (shmq_log_fault_file); the process goes on with its other logs.
 *
 *  1. SIGBUS. Public entry points that touch the mappings run their body
 *     under SHMQ_GUARD (log_internal.h): a sigsetjmp whose buffer is pushed
 *     on a thread-local chain. The handler (installed by the first guard of
 *     each shared object that carries the core, SA_NODEFER so SIGBUS stays
 *     unblocked after the jump) acts only when
 *     the faulting thread is inside a guard AND the fault address lies in a
 *     mapping of the guarded log: it records which file and siglongjmps to
 *     the guard, which returns SHMQ_ERR_STORAGE and marks the handle broken.
 *     Any other SIGBUS goes to the handler installed before ours, or gets
 *     the default action (the process dies, as it would have without us).
 *     A jump abandons what the body was doing: a claim not yet committed is
 *     padded over by the unblocker like a dead producer's, a scratch buffer
 *     of seek_time leaks. Nothing else is held across a guarded body.
 *  2. Files that are gone or replaced do not fault, nor does a shrink within
 *     the last page. shmq__check_files compares every file name of the log
 *     with what was mapped (same inode, same size); log_internal.h's
 *     shmq__after runs it at most once a second per handle, from calls that
 *     found nothing to do (an idle read or wait) and from every 1024th call.
 *
 * A broken handle fails every guarded call at once with SHMQ_ERR_STORAGE;
 * the process reopens the log (which then fails cleanly at open) or drops it.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/stat.h>

#include "log_internal.h"

__thread shmq_guard *shmq__guard_top __attribute__((tls_model("initial-exec")));

static struct sigaction previous;
int shmq__guard_ready;

/* Which file of log holds addr: -1 the control block, 3 * slot + k (k: 0
 * segment, 1 index, 2 time index), or -2 none. Async-signal-safe. */
static int32_t file_at(const shmq_log *log, const uint8_t *addr)
{
    if (log->ctl && addr >= log->ctl && addr < log->ctl + log->ctl_len)
        return -1;
    size_t ib = index_bytes(log->cap, log->interval), tb = tindex_bytes(log->cap, log->interval);
    for (uint32_t i = 0; i < log->n; i++) {
        if (log->seg[i] && addr >= log->seg[i] && addr < log->seg[i] + log->cap)
            return (int32_t)(3 * i);
        if (log->idx[i] && addr >= (const uint8_t *)log->idx[i] && addr < (const uint8_t *)log->idx[i] + ib)
            return (int32_t)(3 * i + 1);
        if (log->tidx[i] && addr >= (const uint8_t *)log->tidx[i] && addr < (const uint8_t *)log->tidx[i] + tb)
            return (int32_t)(3 * i + 2);
    }
    return -2;
}

static void on_sigbus(int sig, siginfo_t *si, void *uctx)
{
    shmq_guard *g = shmq__guard_top;
    if (g) {
        int32_t f = file_at(g->log, (const uint8_t *)si->si_addr);
        if (f != -2) {
            if (g->log->fault_file == -2)
                g->log->fault_file = f;
            siglongjmp(g->env, 1);
        }
    }
    /* Not ours: what would have happened without us. */
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, si, uctx);
    } else if (previous.sa_handler == SIG_DFL || previous.sa_handler == SIG_IGN) {
        /* Returning re-executes the faulting access, now with the default
         * action: the process dies by SIGBUS. */
        signal(SIGBUS, SIG_DFL);
    } else {
        previous.sa_handler(sig);
    }
}

static void install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &previous);
    __atomic_store_n(&shmq__guard_ready, 1, __ATOMIC_RELEASE);
}

void shmq__guard_install(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, install);
}

void shmq__guard_failed(shmq_log *log)
{
    __atomic_store_n(&log->broken, 1, __ATOMIC_RELAXED);
}

/* Name of file f of the log (see file_at). */
static void fault_name(char *out, size_t n, int32_t f)
{
    static const char *exts[] = { "log", "index", "timeindex" };
    if (f == -1)
        snprintf(out, n, "partition.ctl");
    else
        snprintf(out, n, "%d.%s", f / 3, exts[f % 3]);
}

int shmq__check_files(shmq_log *log)
{
    if (log->dirfd < 0 || !log->ino)
        return SHMQ_OK;
    size_t sizes[3] = { log->cap, index_bytes(log->cap, log->interval),
                        tindex_bytes(log->cap, log->interval) };
    for (int32_t f = -1; f < (int32_t)(3 * log->n); f++) {
        char name[64];
        struct stat st;
        fault_name(name, sizeof name, f);
        size_t want = f < 0 ? log->ctl_len : sizes[f % 3];
        if (fstatat(log->dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 || (uint64_t)st.st_ino != log->ino[f + 1] ||
            (size_t)st.st_size != want) {
            if (log->fault_file == -2)
                log->fault_file = f;
            shmq__guard_failed(log);
            return SHMQ_ERR_STORAGE;
        }
    }
    return SHMQ_OK;
}

const char *shmq_log_fault_file(shmq_log *log)
{
    if (log->fault_file == -2)
        return NULL;
    fault_name(log->fault_name, sizeof log->fault_name, log->fault_file);
    return log->fault_name;
}

int shmq_log_check_files(shmq_log *log)
{
    if (__atomic_load_n(&log->broken, __ATOMIC_RELAXED))
        return SHMQ_ERR_STORAGE;
    __atomic_store_n(&log->checked_ns, shmq_now_ns(), __ATOMIC_RELAXED);
    return shmq__check_files(log);
}

static int control_word_body(shmq_log *log, int which, int64_t *out)
{
    shmq_ctl_header *h = log->hdr;
    switch (which) {
    case SHMQ_WORD_APPEND_STATE: *out = __atomic_load_n(&h->append_state, __ATOMIC_ACQUIRE); break;
    case SHMQ_WORD_REPLICATED: *out = __atomic_load_n(&h->replicated, __ATOMIC_ACQUIRE); break;
    case SHMQ_WORD_LEADER_EPOCH: *out = __atomic_load_n(&h->leader_epoch, __ATOMIC_ACQUIRE); break;
    case SHMQ_WORD_LEADER_INDEX: *out = __atomic_load_n(&h->leader_index, __ATOMIC_ACQUIRE); break;
    case SHMQ_WORD_ISR_MASK: *out = __atomic_load_n(&h->isr_mask, __ATOMIC_ACQUIRE); break;
    case SHMQ_WORD_EPOCH_START_OFFSET: *out = __atomic_load_n(&h->epoch_start_offset, __ATOMIC_ACQUIRE); break;
    case SHMQ_WORD_SLOWEST_OFFSET: *out = __atomic_load_n(&h->slowest_offset, __ATOMIC_ACQUIRE); break;
    case SHMQ_WORD_BLOCKED_COUNT: *out = (int64_t)__atomic_load_n(&h->blocked_count, __ATOMIC_RELAXED); break;
    case SHMQ_WORD_BLOCKED_NS: *out = (int64_t)__atomic_load_n(&h->blocked_ns, __ATOMIC_RELAXED); break;
    default:
        if (which >= SHMQ_WORD_REPLICA_LEO && which < SHMQ_WORD_REPLICA_LEO + SHMQ_MAX_REPLICAS)
            *out = (int64_t)__atomic_load_n(&h->replica_leo[which - SHMQ_WORD_REPLICA_LEO], __ATOMIC_ACQUIRE);
        else if (which >= SHMQ_WORD_CAUGHT_UP_NS && which < SHMQ_WORD_CAUGHT_UP_NS + SHMQ_MAX_REPLICAS)
            *out = __atomic_load_n(&h->caught_up_ns[which - SHMQ_WORD_CAUGHT_UP_NS], __ATOMIC_ACQUIRE);
        else
            return SHMQ_ERR_ARG;
    }
    return SHMQ_OK;
}

int shmq_log_control_word(shmq_log *log, int which, int64_t *out)
{
    int r;
    SHMQ_GUARD(log, r, control_word_body(log, which, out));
    return r;
}

static int doorbell_body(shmq_log *log, int32_t delta, uint32_t **word, uint32_t *val)
{
    uint32_t *w = &log->hdr->commit_seq;
    if (val)
        *val = __atomic_load_n(w, __ATOMIC_SEQ_CST);
    if (delta)
        __atomic_fetch_add(&log->hdr->waiters, (uint32_t)delta, __ATOMIC_SEQ_CST);
    if (word)
        *word = w;
    return SHMQ_OK;
}

int shmq_log_doorbell(shmq_log *log, int32_t delta, uint32_t **word, uint32_t *val)
{
    int r;
    SHMQ_GUARD(log, r, doorbell_body(log, delta, word, val));
    return r;
}
