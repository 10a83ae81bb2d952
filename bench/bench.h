/* bench.h - what the C workloads of bench/ share: a monotonic clock and rusage times in seconds. */
#ifndef LEAKHUNT_BENCH_H
#define LEAKHUNT_BENCH_H

#include <sys/resource.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double tv(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

#endif
