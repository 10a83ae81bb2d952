/*
 * page_faults.c - BCC program: who fills memory, by the page faults that allocate its pages, net
 * of the pages given back since.
 *
 * Allocators reserve address space once and commit it by touching it (glibc arenas grown with
 * mprotect, jemalloc and mimalloc segments, Python's arenas, preallocated pools): RSS grows with
 * no mmap in the window. A not-present fault on a user address is the event by which a page is
 * allocated, so this program follows them on the raw exceptions:page_fault_user tracepoint, for
 * the traced pids only (`traced`). Protection faults on present pages (error_code bit 0) allocate
 * nothing and are let go.
 *
 * Pages are kept in the kernel by (pid, 2 MiB bucket): a bucket holds up to SLOTS sites with the
 * pages each has live there (plus one slot for any other site), and one owner byte per page (its
 * slot, and the weight it was counted with). A site is the faulting ip and the return address of
 * the function it is in, read at the stack slot user space found in the CFI for that ip
 * (`ra_slot`, installed after the ip's first exemplar; 0 until then): memset's faults for two
 * callers are two sites, so a caller that keeps its pages and one that gives them back are told
 * apart in the kernel, not by sampling. A page given back (munmap, madvise
 * MADV_DONTNEED / MADV_FREE / MADV_REMOVE / MADV_DONTNEED_LOCKED, mmap MAP_FIXED over it, mremap
 * moving or shrinking it) is taken off its site's count at the syscall's exit: buckets the range
 * covers whole are deleted (by user space, from a `ranges` record, past WHOLE_MAX of them), the
 * pages of a partly covered one are cleared one by one. So a loop
 * that faults a scratch buffer in and gives it back counts for what it keeps, not for every
 * fault, and a page faulted in again is counted once, for its last toucher. A brk that shrinks
 * the heap is not seen: its pages stay counted until faulted in again.
 *
 * The faulting ip is usually memset, memcpy or the allocator itself; the code above it is found
 * in user space by DWARF unwinding of exemplars: the first fault of each (pid, site) and then one
 * in EXEMPLAR_EVERY counted faults per CPU (of sites user space wants more of) are sent with the user registers (the tracepoint's)
 * and STACK_BYTES of stack. At high rates only one fault in 2^config[0] is counted (per-CPU
 * tick), with that weight; `counters` keep every fault seen, the weight given back and every
 * fault dropped because the bucket table was full.
 *
 * Threads of one process faulting in one bucket on two CPUs at once can race on a slot or an
 * owner byte: the counts are estimates to that extent (the weights are added atomically).
 *
 * Arguments (-D): BUCKET_SHIFT, BUCKETS_MAX, SLOTS, STACK_BYTES, EXEMPLAR_EVERY, WHOLE_MAX and
 * the NR_* syscall numbers, from leakhunt.trace.faults.cflags().
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#define PAGES (1 << (BUCKET_SHIFT - 12))
#define OTHER SLOTS                      /* the slot of the ips that found no slot of their own */
#define DUMMY 15                         /* what release() takes an uncounted page's weight off */
_Static_assert(SLOTS + 1 == DUMMY, "an owner byte holds slot + 1 in 4 bits, 0 meaning none");

struct bucket_key_t { u32 pid; u32 pad; u64 bucket; };
struct bucket_t {
    u64 ip[SLOTS + 1];                   /* ip[OTHER] and ra[OTHER] stay 0 */
    u64 ra[SLOTS + 1];
    s64 weight[SLOTS + 2];               /* live pages of each slot, in counted weight; DUMMY */
    u8 owner[PAGES];                     /* 0: not counted; else slot + 1 | log2(weight) << 4 */
};
struct site_t { u32 pid; u32 pad; u64 ip; u64 ra; };
struct exemplar_t {
    u32 pid; u32 tid; u64 ip; u64 ra; u64 sp; u64 bp; u64 addr; u32 nbytes; u32 pad;
    u8 stack[STACK_BYTES];
};
struct range_t { u32 pid; u32 pad; u64 first; u64 count; };   /* whole buckets given back */
struct job_t {                                                  /* one give-back, for give_back() */
    u32 pid; u32 first0; u32 n0; u32 first1; u32 n1; u32 pad;
    u64 bucket0; u64 bucket1; u64 whole_first; u64 whole;
};

BPF_HASH(traced, u32, u8, 4096);
BPF_F_TABLE("hash", struct bucket_key_t, struct bucket_t, buckets, BUCKETS_MAX, BPF_F_NO_PREALLOC);
BPF_HASH(seen, struct site_t, u8, 65536); /* 1: exemplar sent; 2: user space has enough */
BPF_HASH(ra_slot, u64, u32, 65536);      /* ip -> offset from sp of its function's return address */
BPF_ARRAY(config, u64, 2);               /* [0]: log2 of N, counting one fault in N (0: all);
                                           [1]: return-address slots installed so far */
struct slot_cache_t { u64 ip; u64 gen; u64 slot; };   /* slot + 1; 0: none */
BPF_PERCPU_ARRAY(slot_cache, struct slot_cache_t, 1);
BPF_PERCPU_ARRAY(ticks, u64, 2);         /* [0]: sampling tick, [1]: exemplar tick */
BPF_PERCPU_ARRAY(counters, u64, 3);      /* seen, weight given back, dropped (table full) */
BPF_PERCPU_ARRAY(scratch, struct exemplar_t, 1);
BPF_PERCPU_ARRAY(empty, struct bucket_t, 1);   /* never written: a zeroed bucket to insert */
BPF_PERF_OUTPUT(exemplars);
BPF_PERF_OUTPUT(ranges);
BPF_PERCPU_ARRAY(job, struct job_t, 1);
BPF_PROG_ARRAY(steps, 1);                /* [0]: give_back */

static __always_inline void bump(int i, u64 n) {
    u64 *c = counters.lookup(&i);
    if (c)
        *c += n;
}

/* An opaque copy of x: the compiler cannot turn arithmetic on it back into a branch. */
static __always_inline u64 opaque(u64 x) {
    asm volatile("" : "+r"(x));
    return x;
}

/* Takes page p off its slot's count when keep is all ones (nothing when 0); returns the weight
 * taken (0 when the page was not counted). Without a branch: an uncounted or untouched page takes
 * a weight of 1 off the dummy slot DUMMY, so a loop over a bucket's pages is straight-line code
 * for the verifier. */
static __always_inline s64 release(struct bucket_t *b, u32 p, u64 keep) {
    u64 owner = b->owner[p & (PAGES - 1)];
    u64 old = opaque(owner & keep);
    u32 slot = (old + 15) & 15;                       /* 0 -> DUMMY, k -> slot k - 1 */
    s64 weight = 1LL << (old >> 4);
    __sync_fetch_and_add(&b->weight[slot], -weight);
    b->owner[p & (PAGES - 1)] = owner & ~keep;
    return weight & -(s64)((old + 255) >> 8);         /* 0 when old is 0 */
}

/* The raw tracepoint: (address, user pt_regs, error_code), without the perf record the plain
 * tracepoint fills for every fault before the program runs (half the cost at 10k faults/s). */
RAW_TRACEPOINT_PROBE(page_fault_user) {
    if (ctx->args[2] & 1)
        return 0;
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!traced.lookup(&pid))
        return 0;
    u64 address = ctx->args[0];
    struct pt_regs *regs = (struct pt_regs *)ctx->args[1];
    bump(0, 1);
    int zero = 0, one = 1;
    u64 *shift = config.lookup(&zero);
    u64 *tick = ticks.lookup(&zero);
    if (!shift || !tick)
        return 0;
    u32 s = *shift & 15;
    (*tick)++;
    if (s && (*tick & ((1ULL << s) - 1)) != 0)
        return 0;
    u64 ip = 0, sp = 0, ra = 0;
    bpf_probe_read_kernel(&ip, sizeof(ip), &regs->ip);
    /* the slot of ip's return address: the last ip looked up on this CPU is kept (one fault
     * loop faults at one ip), until user space installs another slot (config[1] counts them) */
    struct slot_cache_t *sc = slot_cache.lookup(&zero);
    u64 *gen = config.lookup(&one);
    if (!sc || !gen)
        return 0;
    if (sc->ip != ip || sc->gen != *gen) {
        u32 *slot_at = ra_slot.lookup(&ip);
        sc->ip = ip;
        sc->gen = *gen;
        sc->slot = slot_at ? *slot_at + 1 : 0;
    }
    if (sc->slot) {
        bpf_probe_read_kernel(&sp, sizeof(sp), &regs->sp);
        bpf_probe_read_user(&ra, sizeof(ra), (void *)(sp + sc->slot - 1));
    }

    struct bucket_key_t k = {pid, 0, address >> BUCKET_SHIFT};
    struct bucket_t *b = buckets.lookup(&k);
    if (!b) {
        struct bucket_t *e = empty.lookup(&zero);
        if (!e)
            return 0;
        buckets.update(&k, e);
        b = buckets.lookup(&k);
        if (!b) {
            bump(2, 1ULL << s);
            return 0;
        }
    }
    u32 slot = OTHER;
    int send = 0;
#pragma unroll
    for (int i = 0; i < SLOTS; i++) {
        if (b->ip[i] == ip && b->ra[i] == ra) {
            slot = i;
            break;
        }
        if (b->ip[i] == 0) {
            b->ip[i] = ip;
            b->ra[i] = ra;
            slot = i;
            send = 1;   /* a new (site, bucket): rare, so the site table is only looked at here */
            break;
        }
    }
    u32 p = (address >> 12) & (PAGES - 1);
    bump(1, release(b, p, ~0ULL));  /* faulted again: given back unseen (brk, MADV_FREE) */
    b->owner[p] = (slot + 1) | (s << 4);
    __sync_fetch_and_add(&b->weight[slot], 1LL << s);

    struct site_t st = {pid, 0, ip, ra};
    if (send) {
        send = 0;
        if (!seen.lookup(&st)) {
            u8 yes = 1;
            seen.update(&st, &yes);
            send = 1;
        }
    }
    u64 *xt = ticks.lookup(&one);
    if (!send && xt) {
        (*xt)++;
        if ((*xt % EXEMPLAR_EVERY) == 0) {
            /* an exemplar costs microseconds (a page of stack read and sent): none for a site
             * user space has enough of (it sets 2) */
            u8 *have = seen.lookup(&st);
            send = !have || *have != 2;
        }
    }
    if (!send)
        return 0;
    struct exemplar_t *x = scratch.lookup(&zero);
    if (!x)
        return 0;
    struct pt_regs u = {};
    bpf_probe_read_kernel(&u, sizeof(u), regs);
    x->pid = pid;
    x->tid = (u32)bpf_get_current_pid_tgid();
    x->ip = ip;
    x->ra = ra;
    x->sp = u.sp;
    x->bp = u.bp;
    x->addr = address;
    x->nbytes = 0;
    if (bpf_probe_read_user(x->stack, STACK_BYTES, (void *)u.sp) == 0)
        x->nbytes = STACK_BYTES;
    else if (bpf_probe_read_user(x->stack, STACK_BYTES / 4, (void *)u.sp) == 0)
        x->nbytes = STACK_BYTES / 4;
    exemplars.perf_submit(ctx, x, sizeof(*x));
    return 0;
}

/* The pages n pages of one bucket from page `first` on, n <= PAGES; returns the weight taken. */
static __always_inline s64 clear_part(u32 pid, u64 bucket, u32 first, u32 n) {
    if (!n)
        return 0;
    struct bucket_key_t k = {pid, 0, bucket};
    struct bucket_t *b = buckets.lookup(&k);
    if (!b)
        return 0;
    s64 given = 0;
    if (n >= PAGES) {
#pragma unroll
        for (int j = 0; j <= SLOTS; j++)
            given += b->weight[j];
        buckets.delete(&k);
        return given;
    }
    for (u64 i = 0; i < PAGES; i++)
        given += release(b, first + i, (u64)((s64)opaque(i - n) >> 63));  /* ones while i < n */
    return given;
}

/* A give-back's pages: the job sys_exit left, in a program of its own (reached by tail call), so
 * that the verifier walks the page loops once and not once for every way into them. */
int give_back(struct bpf_raw_tracepoint_args *ctx) {
    int zero = 0;
    struct job_t *j = job.lookup(&zero);
    if (!j)
        return 0;
    s64 given = clear_part(j->pid, j->bucket0, j->first0, j->n0);
    given += clear_part(j->pid, j->bucket1, j->first1, j->n1);
    u64 whole = j->whole;
    for (u32 i = 0; i < WHOLE_MAX; i++) {
        if (i >= whole)
            break;
        given += clear_part(j->pid, j->whole_first + i, 0, PAGES);
    }
    bump(1, given);
    return 0;
}

/* Pages given back, at the exit of the syscall that gave them (the arguments are still in the
 * user registers there): the bucket edges and the whole buckets between go to give_back(). */
RAW_TRACEPOINT_PROBE(sys_exit) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!traced.lookup(&pid))
        return 0;
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    s64 ret = ctx->args[1];
    if (ret < 0 && ret > -4096)
        return 0;
    u64 nr = 0;
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    if (nr != NR_MUNMAP && nr != NR_MADVISE && nr != NR_MMAP && nr != NR_MREMAP)
        return 0;
    struct pt_regs u = {};
    bpf_probe_read_kernel(&u, sizeof(u), regs);
    u64 addr = 0, len = 0;
    if (nr == NR_MUNMAP) {
        addr = u.di, len = u.si;
    } else if (nr == NR_MADVISE) {
        if (u.dx == MADV_DONTNEED || u.dx == MADV_FREE || u.dx == MADV_REMOVE ||
            u.dx == MADV_DONTNEED_LOCKED)
            addr = u.di, len = u.si;
    } else if (nr == NR_MMAP) {
        if ((u.r10 & MAP_FIXED) && !(u.r10 & MAP_FIXED_NOREPLACE))
            addr = (u64)ret, len = u.si;
    } else if ((u64)ret != u.di) {
        addr = u.di, len = u.si;                 /* mremap moved it: the old range is empty */
    } else if (u.dx < u.si) {
        addr = u.di + u.dx, len = u.si - u.dx;   /* shrunk in place */
    }
    if (!len)
        return 0;
    int zero = 0;
    struct job_t *j = job.lookup(&zero);
    if (!j)
        return 0;
    u64 lo = addr & ~4095ULL, hi = (addr + len + 4095) & ~4095ULL;
    u64 first = lo >> BUCKET_SHIFT, last = (hi - 1) >> BUCKET_SHIFT;
    u64 edge = (first + 1) << BUCKET_SHIFT;
    j->pid = pid;
    j->bucket0 = first;
    j->first0 = (lo >> 12) & (PAGES - 1);
    j->n0 = (((hi < edge ? hi : edge) - lo) >> 12);
    j->bucket1 = last;
    j->first1 = 0;
    j->n1 = first == last ? 0 : (hi - (last << BUCKET_SHIFT)) >> 12;
    j->whole_first = first + 1;
    j->whole = last > first + 1 ? last - first - 1 : 0;
    if (j->whole > WHOLE_MAX) {
        /* a large range (a pool or an arena unmapped): its whole buckets are user space's */
        struct range_t r = {pid, 0, first + 1, j->whole};
        ranges.perf_submit(ctx, &r, sizeof(r));
        j->whole = 0;
    }
    steps.call(ctx, 0);
    return 0;
}
