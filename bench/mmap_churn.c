/* mmap_churn: a mmap/munmap-heavy workload for bench/trace.py.
 *
 * Maps, touches and unmaps SIZE bytes COUNT times, at RATE mmaps per second (0: as fast as it
 * can), then prints its own cost so that a tracer's overhead shows as a ratio of CPU time:
 *
 *   mmap_churn --count 500000 --rate 100000 --size 16384
 *   ready 1234
 *   done count=500000 wall_s=5.001 cpu_s=1.234 user_s=0.100 sys_s=1.134 rate=99980
 *
 * With --start-on-stdin it waits for a line on stdin after "ready", so that a tracer can attach
 * before the timed part begins.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"


int main(int argc, char **argv) {
    long count = 200000, size = 16384;
    double rate = 0;
    int wait_stdin = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--count") && i + 1 < argc) count = atol(argv[++i]);
        else if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = atof(argv[++i]);
        else if (!strcmp(argv[i], "--size") && i + 1 < argc) size = atol(argv[++i]);
        else if (!strcmp(argv[i], "--start-on-stdin")) wait_stdin = 1;
        else { fprintf(stderr, "usage: %s [--count N] [--rate N/s] [--size BYTES] [--start-on-stdin]\n", argv[0]); return 2; }
    }
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    if (wait_stdin) {
        char line[64];
        if (!fgets(line, sizeof line, stdin)) return 0;
    }
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    double start = now();
    const long batch = 1000;  /* pace in batches: sleeping per call would measure the sleeps */
    for (long done = 0; done < count;) {
        for (long i = 0; i < batch && done < count; i++, done++) {
            char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) { perror("mmap"); return 1; }
            p[0] = 1;
            munmap(p, size);
        }
        if (rate > 0) {
            double due = start + done / rate, t = now();
            if (due > t) {
                struct timespec ts = {(time_t)(due - t), (long)((due - t - (time_t)(due - t)) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
    }
    double wall = now() - start;
    getrusage(RUSAGE_SELF, &r1);
    double user = tv(r1.ru_utime) - tv(r0.ru_utime), sys = tv(r1.ru_stime) - tv(r0.ru_stime);
    printf("done count=%ld wall_s=%.3f cpu_s=%.3f user_s=%.3f sys_s=%.3f rate=%.0f\n",
           count, wall, user + sys, user, sys, count / wall);
    return 0;
}
