// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// memclock: the Linux guest's memory workload and clock watcher, for snapshot and migration
// tests (the Linux counterpart of the test guest's `dirty`). Built static by ci/linux-guest.sh.
//
//   memclock dirty-start MIB   a daemon rewrites the pages of a MIB MiB region in /dev/shm,
//                              each page self-describing: (generation, index, words derived
//                              from both), so any page can be checked on its own
//   memclock dirty-check       pause the writer, check every page, resume; prints
//                              "OK dirty pages=N bad=B writes=W running=1"
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
/* Pages rewritten per 10 ms: ~25 MiB/s, enough to keep pre-copy busy, light on a nested L2. */
#define BATCH 64

struct dirty_hdr {
    volatile uint64_t pages, writes, pause, paused, heartbeat;
};

struct clock_hdr {
    volatile uint64_t samples, back_mono_ns, back_real_ns, gap_mono_ns, gap_real_ns, heartbeat;
};

static int fail(const char *what) {
    printf("ERR %s: %s\n", what, strerror(errno));
    return 1;
}

static uint64_t word(uint64_t gen, uint64_t index, uint64_t w) {
    uint64_t x = gen * 0x9e3779b97f4a7c15ull ^ index * 0xc2b2ae3d27d4eb4full ^ w;
    x ^= x >> 31;
    return x * 0x94d049bb133111ebull;
}

static void *map(const char *path, size_t len, int create) {
    int fd = open(path, O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_TRUNC : 0), 0600);
    if (fd < 0)
        return NULL;
    if (create && ftruncate(fd, (off_t)len) != 0) {
        close(fd);
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

static void dirty_loop(struct dirty_hdr *h, uint8_t *data) {
    uint64_t next = 0, gen = 1;
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            if (h->pause) {
                h->paused = 1;
                while (h->pause)
                    nap_10ms();
                h->paused = 0;
            }
            write_page((uint64_t *)(data + next * PAGE), gen, next);
            h->writes++;
            if (++next == h->pages) {
                next = 0;
                gen++;
            }
        }
        h->heartbeat++;
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
    uint8_t *m = map(DIRTY_PATH, PAGE + pages * PAGE, 1);
    if (!m)
        return fail("dirty-start: " DIRTY_PATH);
    struct dirty_hdr *h = (struct dirty_hdr *)m;
    h->pages = pages;
    for (uint64_t i = 0; i < pages; i++)
        write_page((uint64_t *)(m + PAGE + i * PAGE), 0, i);
    int d = daemonize();
    if (d < 0)
        return fail("dirty-start: fork");
    if (d == 0)
        dirty_loop(h, m + PAGE);
    printf("OK dirty pages=%llu\n", (unsigned long long)pages);
    return 0;
}

static int dirty_check(void) {
    uint8_t *m = map(DIRTY_PATH, PAGE, 0);
    if (!m)
        return fail("dirty-check: " DIRTY_PATH);
    struct dirty_hdr *h = (struct dirty_hdr *)m;
    h->pause = 1;
    int waited = 0;
    while (!h->paused && waited++ < 1000)
        nap_10ms();
    int running = h->paused != 0;
    uint64_t bad = 0;
    for (uint64_t i = 0; i < h->pages; i++) {
        uint64_t *p = (uint64_t *)(m + PAGE + i * PAGE);
        int ok = p[1] == i;
        for (uint64_t w = 2; ok && w < WORDS; w++)
            ok = p[w] == word(p[0], i, w);
        bad += !ok;
    }
    h->pause = 0;
    printf("OK dirty pages=%llu bad=%llu writes=%llu running=%d\n", (unsigned long long)h->pages,
           (unsigned long long)bad, (unsigned long long)h->writes, running);
    return 0;
}

static uint64_t now_ns(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void track(uint64_t prev, uint64_t cur, volatile uint64_t *back, volatile uint64_t *gap) {
    if (cur < prev && prev - cur > *back)
        *back = prev - cur;
    if (cur > prev && cur - prev > *gap)
        *gap = cur - prev;
}

static int clock_start(void) {
    struct clock_hdr *h = map(CLOCK_PATH, PAGE, 1);
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
        h->samples++;
    }
}

static int clock_check(void) {
    struct clock_hdr *h = map(CLOCK_PATH, PAGE, 0);
    if (!h)
        return fail("clock-check: " CLOCK_PATH);
    printf("OK clock samples=%llu back_mono_us=%llu back_real_us=%llu gap_mono_ms=%llu gap_real_ms=%llu\n",
           (unsigned long long)h->samples, (unsigned long long)(h->back_mono_ns / 1000),
           (unsigned long long)(h->back_real_ns / 1000), (unsigned long long)(h->gap_mono_ns / 1000000),
           (unsigned long long)(h->gap_real_ns / 1000000));
    h->samples = h->back_mono_ns = h->back_real_ns = h->gap_mono_ns = h->gap_real_ns = 0;
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
