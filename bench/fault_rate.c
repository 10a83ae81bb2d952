/* fault_rate: a page-fault-heavy workload for bench/faults.py.
 *
 * Touches COUNT fresh pages at RATE faults per second (0: as fast as it can) inside a 64 MiB
 * window that it gives back with MADV_DONTNEED whenever it has touched all of it, so every touch
 * is a not-present fault, then prints its own cost: a tracer's overhead shows as CPU time.
 *
 *   fault_rate --count 500000 --rate 100000
 *   ready 1234
 *   done count=500000 wall_s=5.001 cpu_s=1.234 user_s=0.100 sys_s=1.134 rate=99980
 *
 * It waits for a line on stdin after "ready", so that a tracer can attach before the timed part.
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

#define WINDOW (64UL << 20)


int main(int argc, char **argv) {
    long count = 500000;
    double rate = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--count")) count = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--rate")) rate = atof(argv[i + 1]);
    }
    long page = sysconf(_SC_PAGESIZE), pages = WINDOW / page;
    volatile char *w = mmap(NULL, WINDOW, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (w == MAP_FAILED) { perror("mmap"); return 1; }
    madvise((void *)w, WINDOW, MADV_NOHUGEPAGE);  /* one fault per 4 KiB page, not per 2 MiB */
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    double start = now();
    long done = 0, at = 0;
    while (done < count) {
        long due = rate > 0 ? (long)((now() - start) * rate) : count;
        if (due > count) due = count;
        while (done < due) {
            w[at * page] = 1;
            done++;
            if (++at == pages) {
                madvise((void *)w, WINDOW, MADV_DONTNEED);
                at = 0;
            }
        }
        if (rate > 0 && done < count) usleep(1000);
    }
    double wall = now() - start;
    getrusage(RUSAGE_SELF, &r1);
    double user = tv(r1.ru_utime) - tv(r0.ru_utime), sys = tv(r1.ru_stime) - tv(r0.ru_stime);
    printf("done count=%ld wall_s=%.3f cpu_s=%.3f user_s=%.3f sys_s=%.3f rate=%.0f\n", done, wall,
           user + sys, user, sys, done / wall);
    return 0;
}
