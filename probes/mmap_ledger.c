/*
 * mmap_ledger.c - BCC program: outstanding mmaps of a process tree, by caller, kept in the kernel.
 *
 * Traces mmap, munmap, mremap, brk, shmat, shmdt and memfd_create of TARGET (plus, with FOLLOW=1,
 * the children it forks after the start: `traced`), all threads, with one program on the raw
 * sys_exit tracepoint: it hands over the user registers, where the arguments still are at exit,
 * so nothing is carried from the entry; at 100k mmap/s this costs a fraction of the per-syscall
 * tracepoints (see bench/trace.py). The caller is the return address of the libc wrapper, read at
 * the stack slot user space found in libc's CFI (`ra_slot`, default sp+0).
 *
 * The common case never leaves the kernel: an mmap goes into `live` and its exact munmap or
 * mremap updates it there, with per-site sums in `sites` (the same scheme as BCC's memleak).
 * Everything else (partial unmaps, MAP_FIXED, brk, shm*, memfd_create, a full `live`) goes to the
 * ring buffer as a CALL record with 16 stack words, without waking the reader (it polls); the
 * first call of each site sends an EXEMPLAR with STACK_BYTES of stack for DWARF unwinding.
 * A failed ring buffer reservation is counted in `counters`: losses are exact. With STREAM_ALL=1
 * every call is streamed and the kernel keeps no ledger (--all-events).
 *
 * Arguments (-D): TARGET, FOLLOW, MIN_LEN, STREAM_ALL, LIVE_MAX, SITES_MAX, RINGBUF_PAGES,
 * STACK_BYTES, the NR_* syscall numbers, MAP_FIXED, MAP_FIXED_NOREPLACE, MREMAP_DONTUNMAP and the
 * record/counter numbering, all supplied by leakhunt.trace.bcc.cflags(). Read by leakhunt.trace.bcc; by hand:
 *     python -m leakhunt.trace.bcc PID      # prints the cflags
 *
 * Example (pool_leaker, as leakhunt.trace.bcc reads it):
 *     live  {pid 4242, addr 0x7f3a2b000000} -> {len 1048576, ip libc!syscall+0x19,
 *            ra libleakpool.so!lkpool_grow+0x2c, ts 1520391416401}
 *     sites {4242, libc!__mmap+0x13, pool_leaker!main+0x37f} -> {count 865, mapped 890306560,
 *            unmapped 890306560}
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

/* Record types (REC_*), lifecycle kinds (PROC_*), the per-CPU counters' indexes (C_*: one per
 * syscall, IDX_*, then the others) come from leakhunt.trace.bcc as -D: it reads them back. */

struct call_t { u64 nr; u64 a[5]; u64 ip; u64 sp; u64 ra; u64 bp; };
struct live_key_t { u32 pid; u32 pad; u64 addr; };
struct live_val_t { u64 len; u64 ip; u64 ra; u64 ts; u32 flags; s32 fd; };
struct site_key_t { u32 pid; u32 pad; u64 ip; u64 ra; };
struct site_val_t { u64 count; u64 mapped; u64 unmapped; };

struct call_rec_t {
    u32 type; u32 pid; u32 tid; u32 nr; u64 ts; u64 a[5]; s64 ret; u64 ip; u64 sp; u64 ra;
    u64 nwords;      /* 16 when the return-address slot of ip was unknown, else 0 */
    u64 words[16];
};
struct exemplar_rec_t {
    u32 type; u32 pid; u64 ts; u64 ip; u64 ra; u64 sp; u64 bp; u32 nbytes; u32 pad;
    u8 stack[STACK_BYTES];
};
struct proc_rec_t { u32 type; u32 pid; u32 kind; u32 child; u64 ts; };

BPF_HASH(traced, u32, u8, 4096);
BPF_HASH(ra_slot, u64, u32, 4096);
BPF_F_TABLE("hash", struct live_key_t, struct live_val_t, live, LIVE_MAX, 0);
BPF_F_TABLE("hash", struct site_key_t, struct site_val_t, sites, SITES_MAX, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(counters, u64, C_COUNT);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

static __always_inline int kind_index(u64 nr) {
    switch (nr) {
    case NR_MMAP: return IDX_MMAP;
    case NR_MUNMAP: return IDX_MUNMAP;
    case NR_MREMAP: return IDX_MREMAP;
    case NR_BRK: return IDX_BRK;
    case NR_SHMAT: return IDX_SHMAT;
    case NR_SHMDT: return IDX_SHMDT;
    case NR_MEMFD_CREATE: return IDX_MEMFD_CREATE;
    }
    return -1;
}

static __always_inline void count(int index, u64 n) {
    u64 *c = counters.lookup(&index);
    if (c)
        *c += n;   /* per-CPU: no atomics needed */
}

static __always_inline u64 page_round(u64 n) { return (n + 4095) & ~4095ULL; }

/* Per-site sums; returns 1 when the site is new (its first call sends an exemplar). */
static __always_inline int site_add(u32 pid, u64 ip, u64 ra, u64 count_n, u64 mapped, u64 unmapped) {
    struct site_key_t k = {.pid = pid, .ip = ip, .ra = ra};
    struct site_val_t *v = sites.lookup(&k);
    int fresh = 0;
    if (!v) {
        struct site_val_t zero = {};
        fresh = sites.insert(&k, &zero) == 0;
        v = sites.lookup(&k);
        if (!v)
            return 0;
    }
    __sync_fetch_and_add(&v->count, count_n);
    __sync_fetch_and_add(&v->mapped, mapped);
    __sync_fetch_and_add(&v->unmapped, unmapped);
    return fresh;
}

static __always_inline void send_exemplar(u32 pid, struct call_t *c) {
    struct exemplar_rec_t *x = events.ringbuf_reserve(sizeof(struct exemplar_rec_t));
    if (!x) {
        count(C_LOST_EXEMPLAR, 1);
        return;
    }
    x->type = REC_EXEMPLAR; x->pid = pid; x->ts = bpf_ktime_get_ns();
    x->ip = c->ip; x->ra = c->ra; x->sp = c->sp; x->bp = c->bp; x->pad = 0;
    /* Near the top of a stack a long read faults: try shorter copies. */
    x->nbytes = STACK_BYTES;
    if (bpf_probe_read_user(x->stack, STACK_BYTES, (void *)c->sp) != 0) {
        x->nbytes = STACK_BYTES / 4;
        if (bpf_probe_read_user(x->stack, STACK_BYTES / 4, (void *)c->sp) != 0) {
            x->nbytes = 256;
            if (bpf_probe_read_user(x->stack, 256, (void *)c->sp) != 0)
                x->nbytes = 0;
        }
    }
    events.ringbuf_submit(x, BPF_RB_NO_WAKEUP);
}

/* A streamed call. The stack words only travel when user space has not told us where the return
 * address is for this ip (`ra_slot`): then it finds it itself, from CFI over the words. */
static __always_inline void stream(u32 pid, u32 tid, struct call_t *c, s64 ret, int slot_known) {
    struct call_rec_t *r = events.ringbuf_reserve(sizeof(struct call_rec_t));
    if (!r) {
        count(C_LOST_CALL, 1);
        return;
    }
    r->type = REC_CALL; r->pid = pid; r->tid = tid; r->nr = c->nr; r->ts = bpf_ktime_get_ns();
    #pragma unroll
    for (int i = 0; i < 5; i++)
        r->a[i] = c->a[i];
    r->ret = ret; r->ip = c->ip; r->sp = c->sp; r->ra = c->ra;
    r->nwords = slot_known ? 0 : 16;
    if (!slot_known && bpf_probe_read_user(r->words, sizeof(r->words), (void *)c->sp) != 0)
        __builtin_memset(r->words, 0, sizeof(r->words));
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

/* One probe, at syscall exit: the arguments are still in the saved user registers (only ax
 * changed), so nothing has to be carried over from the entry, which halves the cost. */
RAW_TRACEPOINT_PROBE(sys_exit) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    u64 nr = 0;
    bpf_probe_read_kernel(&nr, 8, &regs->orig_ax);
    int kind = kind_index(nr);
    if (kind < 0)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32, tid = (u32)pid_tgid;
    if (pid != TARGET && (!FOLLOW || !traced.lookup(&pid)))
        return 0;
    struct pt_regs u = {};
    bpf_probe_read_kernel(&u, sizeof(u), regs);
    struct call_t c = {.nr = nr, .a = {u.di, u.si, u.dx, u.r10, u.r8}, .ip = u.ip, .sp = u.sp, .bp = u.bp};
    u32 *slot = ra_slot.lookup(&c.ip);
    u64 off = slot ? *slot : 0;
    bpf_probe_read_user(&c.ra, 8, (void *)(c.sp + (off & 0xfff)));
    s64 ret = (s64)ctx->args[1];
    count(kind, 1);
    int send = 0, fresh = 0;

    if (STREAM_ALL) {
        if (ret < 0 && nr != NR_BRK)
            count(C_FAILED, 1);
        else if ((nr == NR_MMAP || nr == NR_MUNMAP) && page_round(c.a[1]) < MIN_LEN)
            count(C_FILTERED, 1);
        else
            send = 1;
        if (send && (nr == NR_MMAP || nr == NR_MREMAP || nr == NR_BRK || nr == NR_SHMAT))
            fresh = site_add(pid, c.ip, c.ra, 0, 0, 0);
    } else if (nr == NR_MMAP && ret >= 0) {
        u64 len = page_round(c.a[1]);
        if (c.a[3] & (MAP_FIXED | MAP_FIXED_NOREPLACE)) {
            send = 1;
            fresh = site_add(pid, c.ip, c.ra, 0, 0, 0);
        } else if (len < MIN_LEN) {
            count(C_FILTERED, 1);
        } else {
            struct live_key_t k = {.pid = pid, .addr = (u64)ret};
            struct live_val_t v = {.len = len, .ip = c.ip, .ra = c.ra, .ts = bpf_ktime_get_ns(),
                                   .flags = (u32)c.a[3], .fd = (s32)c.a[4]};
            if (live.update(&k, &v) != 0) {
                count(C_FULL, 1);   /* user space keeps this one */
                send = 1;
                fresh = site_add(pid, c.ip, c.ra, 0, 0, 0);
            } else {
                fresh = site_add(pid, c.ip, c.ra, 1, len, 0);
            }
        }
    } else if (nr == NR_MUNMAP && ret == 0) {
        u64 len = page_round(c.a[1]);
        struct live_key_t k = {.pid = pid, .addr = c.a[0]};
        struct live_val_t *v = live.lookup(&k);
        if (v && v->len == len) {
            site_add(pid, v->ip, v->ra, 0, 0, len);
            live.delete(&k);
        } else if (len < MIN_LEN) {
            count(C_FILTERED, 1);
        } else {
            send = 1;
        }
    } else if (nr == NR_MREMAP && ret >= 0) {
        u64 olen = page_round(c.a[1]), nlen = page_round(c.a[2]);
        struct live_key_t k = {.pid = pid, .addr = c.a[0]};
        struct live_val_t *v = live.lookup(&k);
        if (v && v->len == olen && !(c.a[3] & MREMAP_DONTUNMAP)) {
            struct live_val_t moved = *v;
            moved.len = nlen;
            live.delete(&k);
            struct live_key_t nk = {.pid = pid, .addr = (u64)ret};
            if (live.update(&nk, &moved) != 0) {
                count(C_FULL, 1);
                send = 1;
            } else if (nlen > olen) {
                site_add(pid, moved.ip, moved.ra, 0, nlen - olen, 0);
            } else if (nlen < olen) {
                site_add(pid, moved.ip, moved.ra, 0, 0, olen - nlen);
            }
        } else {
            send = 1;
            fresh = site_add(pid, c.ip, c.ra, 0, 0, 0);
        }
    } else if (nr == NR_BRK || nr == NR_SHMAT) {
        if (nr == NR_BRK || ret >= 0) {
            send = 1;
            fresh = site_add(pid, c.ip, c.ra, 0, 0, 0);
        } else {
            count(C_FAILED, 1);
        }
    } else if ((nr == NR_SHMDT || nr == NR_MEMFD_CREATE) && ret >= 0) {
        send = 1;
    } else {
        count(C_FAILED, 1);
    }
    if (fresh)
        send_exemplar(pid, &c);
    if (send)
        stream(pid, tid, &c, ret, slot != 0);
    return 0;
}

static __always_inline void send_proc(u32 pid, u32 kind, u32 child) {
    struct proc_rec_t *r = events.ringbuf_reserve(sizeof(struct proc_rec_t));
    if (!r) {
        count(C_LOST_PROC, 1);
        return;
    }
    r->type = REC_PROC; r->pid = pid; r->kind = kind; r->child = child; r->ts = bpf_ktime_get_ns();
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

/* The tracepoint's own format, not task_struct: BCC compiles against headers that need not
 * match the running kernel's layout. It fires for new threads too; user space tells them apart
 * (an entry for a thread is harmless: filtering is on the thread group id, and exit removes it). */
TRACEPOINT_PROBE(sched, sched_process_fork) {
    if (!FOLLOW)
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!traced.lookup(&parent))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    traced.update(&child, &one);
    send_proc(parent, PROC_FORK, child);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (traced.lookup(&pid))
        send_proc(pid, PROC_EXEC, 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 pid = pid_tgid >> 32, tid = (u32)pid_tgid;
    if (!traced.lookup(&tid))
        return 0;
    if (pid == tid)
        send_proc(pid, PROC_EXIT, 0);
    if (tid != TARGET)
        traced.delete(&tid);   /* a followed process's leader, or a thread recorded at fork */
    return 0;
}
