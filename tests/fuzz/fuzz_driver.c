/*
 * main() of a harness built without libFuzzer: replay the files named on the
 * command line, then mutate seeds for a time budget.
 *
 *   fuzz_<name> [--seconds S] [--seed N] [--crash-dir D] [--write-seeds D] [FILE|DIR ...]
 *
 * Every FILE (or every file of DIR) is run once and joins the pool of
 * inputs to mutate, with the harness's own seeds. The mutation loop is a
 * deterministic PRNG (--seed) over: bit flips, random bytes, interesting
 * integers (0, -1, +-1 around powers of two, INT32/INT64 limits; 1, 2, 4, 8
 * bytes, either byte order, often at 8-aligned positions where frame
 * headers and control-block words sit), chunk copies, truncation,
 * extension, and splices of two inputs; a mutated input occasionally joins
 * the pool, so mutations stack. Under a sanitizer, a report calls the death
 * callback, which saves the input that caused it as D/crash-<hash> (default
 * D: the current directory); a hang past 10 s per input is saved the same
 * way. Exit status 0 means no input crashed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz.h"

#define POOL_MAX 512
#define MAX_LEN (1u << 20)
#define HANG_SECONDS 10

void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

static fuzz_input pool[POOL_MAX];
static size_t npool, nfixed;
static const uint8_t *current;
static size_t current_len;
static const char *crash_dir = ".";

static uint64_t fnv(const uint8_t *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

static void save_current(void)
{
    fuzz_remove_dirs();                     /* the process is ending: leave nothing in /dev/shm */
    if (!current)
        return;
    char path[4096];
    snprintf(path, sizeof path, "%s/crash-%016llx", crash_dir, (unsigned long long)fnv(current, current_len));
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd >= 0) {
        ssize_t w = write(fd, current, current_len);
        close(fd);
        fprintf(stderr, "fuzz: input of %zu bytes saved as %s (%zd written)\n", current_len, path, w);
    }
}

/* UBSan reports end in abort() (see __ubsan_default_options): save the input first. */
static void on_abort(int sig)
{
    save_current();
    signal(sig, SIG_DFL);
    raise(sig);
}

const char *__ubsan_default_options(void) { return "print_stacktrace=1:abort_on_error=1"; }

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "fuzz: an input ran longer than the hang limit\n";
    ssize_t w = write(2, msg, sizeof msg - 1);
    (void)w;
    save_current();
    _exit(3);
}

static void run_one(const uint8_t *data, size_t len)
{
    current = data;
    current_len = len;
    alarm(HANG_SECONDS);
    LLVMFuzzerTestOneInput(data, len);
    alarm(0);
    current = NULL;
}

static void add_pool(uint8_t *data, size_t len)
{
    if (npool < POOL_MAX) {
        pool[npool].data = data;
        pool[npool++].len = len;
    } else {
        free(data);
    }
}

static int read_file(const char *path, uint8_t **out, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    uint8_t *buf = malloc(MAX_LEN);
    size_t n = fread(buf, 1, MAX_LEN, f);
    fclose(f);
    *out = realloc(buf, n ? n : 1);
    *len = n;
    return 0;
}

static void replay_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "fuzz: cannot read %s\n", path);
        exit(2);
    }
    if (S_ISDIR(st.st_mode)) {
        struct dirent **names;
        int n = scandir(path, &names, NULL, alphasort);
        for (int i = 0; i < n; i++) {
            char sub[4096];
            snprintf(sub, sizeof sub, "%s/%s", path, names[i]->d_name);
            if (names[i]->d_name[0] != '.' && stat(sub, &st) == 0 && S_ISREG(st.st_mode))
                replay_path(sub);
            free(names[i]);
        }
        free(names);
        return;
    }
    uint8_t *data;
    size_t len;
    if (read_file(path, &data, &len) != 0) {
        fprintf(stderr, "fuzz: cannot read %s\n", path);
        exit(2);
    }
    run_one(data, len);
    add_pool(data, len);
}

static const int64_t interesting[] = {
    0, 1, -1, 2, 7, 8, 16, 61, 64, 72, 127, 128, 255, 256, 4095, 4096, 4097, 32767, 32768, 65535, 65536,
    0x3FFFFFFF, 0x40000000, 0x7FFFFFFF, (int64_t)0x80000000LL, (int64_t)0xFFFFFFFFLL, INT64_MAX, INT64_MIN,
    -2, -8, -72, -4096, INT32_MIN, (int64_t)0xFFFFFFFF00000000ULL,
};

static size_t mutate(uint8_t *buf, size_t len, size_t cap, uint64_t *r)
{
    int rounds = 1 + (int)(fuzz_rand(r) % 4);
    for (int k = 0; k < rounds; k++) {
        uint64_t pick = fuzz_rand(r) % 10;
        size_t pos = len ? (size_t)(fuzz_rand(r) % len) : 0;
        if (len == 0)
            pick = 7;
        switch (pick) {
        case 0: case 1:                                   /* bit flip */
            buf[pos] ^= (uint8_t)(1u << (fuzz_rand(r) % 8));
            break;
        case 2:                                           /* random byte */
            buf[pos] = (uint8_t)fuzz_rand(r);
            break;
        case 3: case 4: case 5: {                          /* interesting integer */
            uint64_t v = (uint64_t)interesting[fuzz_rand(r) % (sizeof interesting / sizeof interesting[0])];
            v += fuzz_rand(r) % 3 - 1;                     /* v - 1, v or v + 1 (wrapping) */
            size_t w = (size_t)1 << (fuzz_rand(r) % 4);
            if (fuzz_rand(r) % 2)
                pos &= ~(size_t)7;
            if (pos + w > len)
                break;
            uint8_t bytes[8];
            memcpy(bytes, &v, 8);                          /* little-endian host */
            for (size_t b = 0; b < w; b++)
                buf[pos + b] = (fuzz_rand(r) % 2) ? bytes[b] : bytes[w - 1 - b];
            break;
        }
        case 6: {                                          /* copy a chunk within */
            size_t src = (size_t)(fuzz_rand(r) % len), n = 1 + (size_t)(fuzz_rand(r) % 64);
            if (src + n <= len && pos + n <= len)
                memmove(buf + pos, buf + src, n);
            break;
        }
        case 7: {                                          /* extend */
            size_t n = 1 + (size_t)(fuzz_rand(r) % 64);
            if (len + n <= cap) {
                for (size_t b = 0; b < n; b++)
                    buf[len + b] = (uint8_t)fuzz_rand(r);
                len += n;
            }
            break;
        }
        case 8:                                            /* truncate */
            len = pos;
            break;
        default: {                                         /* splice */
            const fuzz_input *o = &pool[fuzz_rand(r) % npool];
            if (o->len > pos) {
                size_t n = o->len - pos < cap - pos ? o->len - pos : cap - pos;
                if (n > 256)
                    n = 1 + (size_t)(fuzz_rand(r) % 256);
                memcpy(buf + pos, o->data + pos, n);
                if (pos + n > len)
                    len = pos + n;
            }
        }
        }
    }
    return len;
}

static void write_seeds(const char *dir)
{
    mkdir(dir, 0700);
    for (size_t i = 0; i < nfixed; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/seed-%zu", dir, i);
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(pool[i].data, 1, pool[i].len, f) != pool[i].len)
            fuzz_die(path, -1);
        fclose(f);
    }
}

int main(int argc, char **argv)
{
    double seconds = 0;
    uint64_t seed = 1;
    const char *seeds_out = NULL;
    LLVMFuzzerInitialize(&argc, &argv);
    signal(SIGALRM, on_alarm);
    signal(SIGABRT, on_abort);
    if (__sanitizer_set_death_callback)
        __sanitizer_set_death_callback(save_current);
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        if (i + 1 >= argc)
            fuzz_die("option without a value", i);
        if (!strcmp(argv[i], "--seconds"))
            seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--seed"))
            seed = strtoull(argv[i + 1], NULL, 0);
        else if (!strcmp(argv[i], "--crash-dir"))
            crash_dir = argv[i + 1];
        else if (!strcmp(argv[i], "--write-seeds"))
            seeds_out = argv[i + 1];
        else
            fuzz_die(argv[i], i);
    }
    /* Seeds run after the options are read, so a crashing seed lands in --crash-dir. */
    npool = fuzz_seeds(pool, POOL_MAX / 2);
    nfixed = npool;
    for (size_t k = 0; k < nfixed; k++)
        run_one(pool[k].data, pool[k].len);
    if (seeds_out)
        write_seeds(seeds_out);
    size_t replayed = npool;
    for (; i < argc; i++)
        replay_path(argv[i]);
    replayed = npool - replayed;
    uint64_t r = seed, runs = 0;
    uint8_t *buf = malloc(MAX_LEN);
    int64_t t0 = fuzz_real_ns();
    double elapsed = 0;
    while (elapsed < seconds && npool) {
        const fuzz_input *base = &pool[fuzz_rand(&r) % npool];
        size_t len = base->len < MAX_LEN ? base->len : MAX_LEN;
        memcpy(buf, base->data, len);
        len = mutate(buf, len, MAX_LEN, &r);
        run_one(buf, len);
        runs++;
        if (fuzz_rand(&r) % 16 == 0) {                     /* let mutations stack */
            uint8_t *keep = malloc(len ? len : 1);
            memcpy(keep, buf, len);
            if (npool < POOL_MAX) {
                add_pool(keep, len);
            } else {
                size_t victim = nfixed + (size_t)(fuzz_rand(&r) % (POOL_MAX - nfixed));
                free(pool[victim].data);
                pool[victim].data = keep;
                pool[victim].len = len;
            }
        }
        if ((runs & 63) == 0) {
            elapsed = (double)(fuzz_real_ns() - t0) / 1e9;
        }
    }
    free(buf);
    for (size_t k = 0; k < npool; k++)
        free(pool[k].data);
    fprintf(stderr, "fuzz: %s: %zu seeds, %zu replayed, %llu mutated inputs in %.1f s (seed %llu), no crash\n",
            argv[0], nfixed, replayed, (unsigned long long)runs, elapsed, (unsigned long long)seed);
    return 0;
}
