/*
 * page_faults.c - BCC program: who fills memory, by the page faults that allocate its pages.
 *
 * Allocators reserve address space once and commit it by touching it (glibc arenas grown with
 * mprotect, jemalloc and mimalloc segments, Python's arenas, preallocated pools): RSS grows with
 * no mmap in the window. A not-present fault on a user address is the event by which a page is
 * allocated, so this program counts them on the raw exceptions:page_fault_user tracepoint, for
 * the traced pids only
 * (`traced`), in the kernel, by (pid, faulting ip, 2 MiB address bucket). Protection faults on
 * present pages (error_code bit 0) allocate nothing and are let go.
 *
 * The faulting ip is usually memset, memcpy or the allocator itself; the code above it is found
 * in user space by DWARF unwinding of exemplars: the first fault of each (pid, ip) and then one
 * in EXEMPLAR_EVERY sampled faults per CPU are sent with the user registers (the tracepoint's)
 * and STACK_BYTES of stack. At high rates only one fault in `config[0]` is counted (per-CPU
 * tick), and user space scales the counts back; `counters` keep every fault seen and every
 * count dropped for a full table, exactly.
 *
 * Arguments (-D): BUCKET_SHIFT, FAULT_KEYS, STACK_BYTES, EXEMPLAR_EVERY, from
 * leakhunt.trace.faults.cflags().
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

struct key_t { u32 pid; u32 pad; u64 ip; u64 bucket; };
struct site_t { u32 pid; u32 pad; u64 ip; };
struct exemplar_t {
    u32 pid; u32 tid; u64 ip; u64 sp; u64 bp; u64 addr; u32 nbytes; u32 pad;
    u8 stack[STACK_BYTES];
};

BPF_HASH(traced, u32, u8, 4096);
BPF_HASH(faults, struct key_t, u64, FAULT_KEYS);
BPF_HASH(seen, struct site_t, u8, 65536);
BPF_ARRAY(config, u64, 1);               /* [0]: count one fault in this many (1: all) */
BPF_PERCPU_ARRAY(ticks, u64, 2);         /* [0]: sampling tick, [1]: exemplar tick */
BPF_PERCPU_ARRAY(counters, u64, 3);      /* seen, (unused), dropped (the table was full) */
BPF_PERCPU_ARRAY(scratch, struct exemplar_t, 1);
BPF_PERF_OUTPUT(exemplars);

static __always_inline void bump(int i) {
    u64 *c = counters.lookup(&i);
    if (c)
        (*c)++;
}

/* The raw tracepoint: (address, user pt_regs, error_code), without the perf record the plain
 * tracepoint fills for every fault before the program runs (half the cost at 10k faults/s). */
RAW_TRACEPOINT_PROBE(page_fault_user) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (!traced.lookup(&pid))
        return 0;
    u64 address = ctx->args[0];
    struct pt_regs *regs = (struct pt_regs *)ctx->args[1];
    u64 error_code = ctx->args[2];
    if (error_code & 1)
        return 0;
    u64 ip = 0;
    bpf_probe_read_kernel(&ip, sizeof(ip), &regs->ip);
    bump(0);
    int zero = 0, one = 1;
    u64 *every = config.lookup(&zero);
    u64 *tick = ticks.lookup(&zero);
    if (!every || !tick)
        return 0;
    (*tick)++;
    if (*every > 1 && (*tick % *every) != 0)
        return 0;
    struct key_t k = {pid, 0, ip, address >> BUCKET_SHIFT};
    u64 *c = faults.lookup(&k);
    int send = 0;
    if (c) {
        __sync_fetch_and_add(c, 1);
    } else {
        /* a new (ip, bucket): rare, so the site table is only looked at here */
        u64 first = 1;
        if (faults.update(&k, &first) != 0)
            bump(2);
        struct site_t s = {pid, 0, ip};
        if (!seen.lookup(&s)) {
            u8 yes = 1;
            seen.update(&s, &yes);
            send = 1;
        }
    }
    u64 *xt = ticks.lookup(&one);
    if (!send && xt) {
        (*xt)++;
        send = (*xt % EXEMPLAR_EVERY) == 0;
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
