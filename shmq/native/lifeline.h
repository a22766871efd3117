/*
 * Lifeline: a process-shared robust mutex that a replica process holds for
 * its whole life, so another process learns of its death at once.
 *
 * Why: a killed process closes its sockets only after the kernel has torn
 * down its memory, which for a process mapping hundreds of MiB of populated
 * log segments takes 100 ms and more. The kernel releases a dead thread's
 * robust mutexes first (robust-list processing runs before the address
 * space is dropped), marking them owner-dead and waking a waiter.
 *
 * Layout: the mutex sits at the start of a small shared file
 * (<root>/replica-<id>.alive, one page). Who writes what:
 *   - the coordinator creates the file and initialises the mutex once
 *     (shmq_lifeline_init) before any replica process may open it;
 *   - the replica process locks it and never unlocks (shmq_lifeline_hold);
 *   - the coordinator's watcher calls shmq_lifeline_watch, which blocks while
 *     the mutex is held and reports an owner's death (it takes and releases
 *     the mutex itself, so it never keeps a new replica process out for long).
 * All state lives in the pthread mutex; nothing else is read from the file.
 */
#ifndef SHMQ_LIFELINE_H
#define SHMQ_LIFELINE_H
#include <stdint.h>

#define SHMQ_LIFELINE_BYTES 4096
#define SHMQ_LIFELINE_DEAD 1     /* the holder died (its death is reported once) */
#define SHMQ_LIFELINE_FREE 0     /* nobody held it */
#define SHMQ_LIFELINE_HELD 2     /* still held when the timeout passed */

/* Initialise the robust, process-shared mutex at mem (SHMQ_LIFELINE_BYTES). */
int shmq_lifeline_init(void *mem);
/* Lock it for good (recovering it from a dead previous holder). 0 or -errno. */
int shmq_lifeline_hold(void *mem);
/* Wait up to timeout_ns for the mutex: SHMQ_LIFELINE_DEAD if its holder
 * died, SHMQ_LIFELINE_FREE if it was not held, SHMQ_LIFELINE_HELD on
 * timeout; -errno on error. Leaves the mutex unlocked and consistent. */
int shmq_lifeline_watch(void *mem, int64_t timeout_ns);

#endif
