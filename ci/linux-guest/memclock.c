// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// memclock: the Linux guest's memory workload and clock watcher, for snapshot and migration
// tests (the Linux counterpart of the test guest's `dirty`). Built static by ci/linux-guest.sh.
//
//   memclock dirty-start MIB   a daemon rewrites the pages of a MIB MiB region in /dev/shm,
//                              each page self-describing: (generation, index, words derived
//                              from both), so any page can be checked on its own
//   memclock dirty-check       pause the writer, check every page, resume; prints
//                              "OK dirty pages=N bad=B writes=W running=1". A page is good
//                              when it is self-consistent *and* of the generation the writer
//                              left it at: pages before the writer's position carry its
//                              generation, the others the one before (a page a migration
//                              failed to re-send is an older, self-consistent copy)
//   memclock clock-start       a daemon samples CLOCK_MONOTONIC and CLOCK_REALTIME every 10 ms
//   memclock clock-check       prints the largest backward step and forward gap of each clock
//                              since the last check, then starts a new interval:
//                              "OK clock samples=N back_mono_us=.. back_real_us=.. gap_mono_ms=.. gap_real_ms=.."
// Errors print "ERR ..." and exit 1.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define DIRTY_PATH "/dev/shm/memclock-dirty"
#define CLOCK_PATH "/dev/shm/memclock-clock"
#define MAX_MIB 1024
/* Pages rewritten per 10 ms: ~6 MiB/s, enough to keep pre-copy busy and light enough for an
 * L2 whose every instruction QEMU TCG emulates in the nested suite. */
#define BATCH 16

/* Shared with the daemon through /dev/shm; every field is accessed with __atomic builtins. */
struct dirty_hdr {
    uint64_t pages, writes, pause, paused, next, gen;
};

struct clock_hdr {
    uint64_t samples, back_mono_ns, back_real_ns, gap_mono_ns, gap_real_ns;
};

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_SEQ_CST)

static int fail(const char *what) {
    printf("ERR %s: %s\n", what, strerror(errno));
    return 1;
}

static uint64_t word(uint64_t gen, uint64_t index, uint64_t w) {
    uint64_t x = gen * 0x9e3779b97f4a7c15ull ^ index * 0xc2b2ae3d27d4eb4full ^ w;
    x ^= x >> 31;
    return x * 0x94d049bb133111ebull;
}

/* Map `path`: created (once: a second start is refused) with `len` bytes really allocated
 * (no SIGBUS later when /dev/shm is full), or an existing regular file of at least `len`. */
static void *map(const char *path, size_t len, int create, size_t *mapped) {
    int fd = open(path, O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0), 0600);
    if (fd < 0)
        return NULL;
    if (create && (errno = posix_fallocate(fd, 0, (off_t)len)) != 0) {
        close(fd);
        unlink(path);
        return NULL;
    }
    if (!create) {
        struct stat st;
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (size_t)st.st_size < len) {
            close(fd);
            errno = EINVAL;
            return NULL;
        }
        len = (size_t)st.st_size;
    }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (mapped)
        *mapped = len;
    return p == MAP_FAILED ? NULL : p;
}

static void write_page(uint64_t *p, uint64_t gen, uint64_t index) {
    p[1] = index;
    for (uint64_t w = 2; w < WORDS; w++)
        p[w] = word(gen, index, w);
    p[0] = gen;
}

static void nap_10ms(void) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
}

static void dirty_loop(struct dirty_hdr *h, uint8_t *data, uint64_t pages) {
    uint64_t next = 0, gen = 1;
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            if (LOAD(h->pause)) {
                /* Publish where the sweep stands, then acknowledge and wait to go on. */
                STORE(h->next, next);
                STORE(h->gen, gen);
                STORE(h->paused, 1);
                while (LOAD(h->pause))
                    nap_10ms();
                STORE(h->paused, 0);
            }
            write_page((uint64_t *)(data + next * PAGE), gen, next);
            __atomic_add_fetch(&h->writes, 1, __ATOMIC_SEQ_CST);
            if (++next == pages) {
                next = 0;
                gen++;
            }
        }
        nap_10ms();
    }
}

/* Detach from the agent's shell: the daemon outlives the command. */
static int daemonize(void) {
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid > 0)
        return 1;
    setsid();
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
    }
    return 0;
}

static int dirty_start(long mib) {
    if (mib <= 0 || mib > MAX_MIB) {
        printf("ERR dirty-start: size in MiB, 1..%d\n", MAX_MIB);
        return 1;
    }
    uint64_t pages = (uint64_t)mib * 256;
    uint8_t *m = map(DIRTY_PATH, PAGE + pages * PAGE, 1, NULL);
    if (!m)
        return fail("dirty-start: " DIRTY_PATH);
    struct dirty_hdr *h = (struct dirty_hdr *)m;
    STORE(h->pages, pages);
    for (uint64_t i = 0; i < pages; i++)
        write_page((uint64_t *)(m + PAGE + i * PAGE), 0, i);
    int d = daemonize();
    if (d < 0)
        return fail("dirty-start: fork");
    if (d == 0)
        dirty_loop(h, m + PAGE, pages);
    printf("OK dirty pages=%llu\n", (unsigned long long)pages);
    return 0;
}

/* Whether page `i` is whole and of the generation the paused writer left it at. */
static int page_ok(const uint8_t *data, uint64_t i, uint64_t next, uint64_t gen) {
    const uint64_t *p = (const uint64_t *)(data + i * PAGE);
    uint64_t want = i < next ? gen : gen - 1;
    if (p[0] != want || p[1] != i)
        return 0;
    for (uint64_t w = 2; w < WORDS; w++)
        if (p[w] != word(want, i, w))
            return 0;
    return 1;
}

static int dirty_check(void) {
    size_t len = 0;
    uint8_t *m = map(DIRTY_PATH, PAGE, 0, &len);
    if (!m)
        return fail("dirty-check: " DIRTY_PATH);
    struct dirty_hdr *h = (struct dirty_hdr *)m;
    uint64_t pages = LOAD(h->pages);
    if (pages > (len - PAGE) / PAGE) {
        printf("ERR dirty-check: header says %llu pages, the file holds fewer\n", (unsigned long long)pages);
        return 1;
    }
    /* The writer has left the previous check's pause (bounded), then stops again. */
    int waited = 0;
    while (LOAD(h->paused) && waited++ < 1000)
        nap_10ms();
    STORE(h->pause, 1);
    waited = 0;
    while (!LOAD(h->paused) && waited++ < 1000)
        nap_10ms();
    int running = LOAD(h->paused) == 1;
    uint64_t bad = 0, next = LOAD(h->next), gen = LOAD(h->gen);
    for (uint64_t i = 0; running && i < pages; i++)
        bad += !page_ok(m + PAGE, i, next, gen);
    STORE(h->pause, 0);
    printf("OK dirty pages=%llu bad=%llu writes=%llu running=%d\n", (unsigned long long)pages,
           (unsigned long long)bad, (unsigned long long)LOAD(h->writes), running);
    return 0;
}

static uint64_t now_ns(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void track(uint64_t prev, uint64_t cur, uint64_t *back, uint64_t *gap) {
    if (cur < prev && prev - cur > LOAD(*back))
        STORE(*back, prev - cur);
    if (cur > prev && cur - prev > LOAD(*gap))
        STORE(*gap, cur - prev);
}

static int clock_start(void) {
    struct clock_hdr *h = map(CLOCK_PATH, PAGE, 1, NULL);
    if (!h)
        return fail("clock-start: " CLOCK_PATH);
    int d = daemonize();
    if (d < 0)
        return fail("clock-start: fork");
    if (d > 0) {
        printf("OK clock\n");
        return 0;
    }
    uint64_t mono = now_ns(CLOCK_MONOTONIC), real = now_ns(CLOCK_REALTIME);
    for (;;) {
        nap_10ms();
        uint64_t m = now_ns(CLOCK_MONOTONIC), r = now_ns(CLOCK_REALTIME);
        track(mono, m, &h->back_mono_ns, &h->gap_mono_ns);
        track(real, r, &h->back_real_ns, &h->gap_real_ns);
        mono = m, real = r;
        __atomic_add_fetch(&h->samples, 1, __ATOMIC_SEQ_CST);
    }
}

static int clock_check(void) {
    struct clock_hdr *h = map(CLOCK_PATH, PAGE, 0, NULL);
    if (!h)
        return fail("clock-check: " CLOCK_PATH);
    /* Read and restart each figure in one step: the daemon may be updating it. */
#define TAKE(x) __atomic_exchange_n(&(x), 0, __ATOMIC_SEQ_CST)
    uint64_t n = TAKE(h->samples), bm = TAKE(h->back_mono_ns), br = TAKE(h->back_real_ns);
    uint64_t gm = TAKE(h->gap_mono_ns), gr = TAKE(h->gap_real_ns);
    printf("OK clock samples=%llu back_mono_us=%llu back_real_us=%llu gap_mono_ms=%llu gap_real_ms=%llu\n",
           (unsigned long long)n, (unsigned long long)(bm / 1000), (unsigned long long)(br / 1000),
           (unsigned long long)(gm / 1000000), (unsigned long long)(gr / 1000000));
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *cmd = argc > 1 ? argv[1] : "";
    if (!strcmp(cmd, "dirty-start") && argc == 3)
        return dirty_start(strtol(argv[2], NULL, 10));
    if (!strcmp(cmd, "dirty-check"))
        return dirty_check();
    if (!strcmp(cmd, "clock-start"))
        return clock_start();
    if (!strcmp(cmd, "clock-check"))
        return clock_check();
    printf("ERR usage: memclock dirty-start MIB | dirty-check | clock-start | clock-check\n");
    return 1;
}
