/* Matrix products for decode and small batches, out[t][i] = dot(w[i], x[t]) for a few rows x[t], and the
 * rest of a decode step, on a thread pool of our own.
 *
 * Compiled on first use by babyllama/kernels_native.py with the system C compiler (cc -O3 -march=native, or
 * a forced instruction set such as -march=x86-64-v3) and called through ctypes. Weight types (Mat.type):
 *
 *  - F32: memory-bound for one row (every weight is read once per token), so the point is to stream the
 *    weights at full bandwidth on all threads. Several rows x[t] make it arithmetic-bound on AVX-512 (8 tokens:
 *    16 FLOP per 4-byte weight), so blocks of weight rows x tokens share every load (see f32_block).
 *  - F16, BF16: IEEE half-precision weights (an F16 GGUF's) or bfloat16 ones (a BF16 GGUF's, a Hugging Face
 *    checkpoint's), read by the F32 code converted exactly to fp32 as they are loaded: the same sums as F32 on
 *    the converted values, from half the bytes.
 *  - Q8 (runq.c's scheme, babyllama .bin version 2): int8 values (rows, n) and one fp32 scale per group of gs.
 *  - Q8_0 and Q4_0 in llama.cpp's block layout (GGUF, babyllama .bin version 3): blocks of 32 weights, each an
 *    fp16 scale followed by 32 int8 values (Q8_0) or 16 bytes of nibbles q, weight = q - 8 (Q4_0): byte j
 *    holds weight j in its low nibble and weight j + 16 in its high one.
 *  - Q4_0R and Q8_0R: the same blocks, each row's bytes regrouped once for the SIMD kernels (see W_Q4_0R), the
 *    order decode steps read a model's Q4_0 and Q8_0 blocks in.
 *  - Q8R: Q8 with groups of 32 or 64, each row's values regrouped as Q8_0R's and its fp32 scales after each
 *    group (see W_Q8R): the order decode steps read a .bin version 2 model in.
 *
 * Quantized products quantize the activations per group like the weights (scale = max|x|/127,
 * q = round(x/scale); groups of gs for Q8, of 32 for the block types) and compute
 *        out[t][i] = sum_g  w_s[i][g] * x_s[t][g] * sum_{k in g} w_q[i][k] * x_q[t][k].
 * The inner integer sum is exact; it is computed 32 products at a time as (unsigned |w|) x (signed x * sign(w)),
 * the same products, with VNNI's vpdpbusd where the CPU has it (one instruction for four products summed into
 * int32), else AVX2's maddubs (pairs into int16: at most 2 * 128 * 127, no overflow) and madd.
 *
 * The KV cache that attention reads holds fp32 or IEEE fp16 keys and values, or Q8_0 rows (KV_F32, KV_F16,
 * KV_Q8; attention_step): fp16 values are rounded to nearest even as they are written, Q8_0 rows quantized
 * per group like the activations, and both are read back into the same fp32 arithmetic.
 *
 * Exactness: every output row's arithmetic is the same whatever the thread count, the chunk a thread takes and
 * the number of tokens in the call (a token's sums run in the same order for 1 token or 8), so a sequence
 * decoded alone or in a batch gets identical logits. Different instruction sets (AVX2, AVX-512) sum in
 * different orders.
 *
 * Threads: a persistent pool (below). A parallel call's rows are cut into chunks; each thread owns a contiguous
 * run of chunks (one stream for the prefetchers) which it claims one at a time through an atomic counter, and
 * threads that run out take chunks from the far end of the others' runs. The caller works too and waits only
 * for chunks that were claimed: a thread that the OS has not scheduled yet holds nothing up, which keeps a busy
 * machine (a co-runner on a core) from stalling every product at a barrier.
 */
#define _GNU_SOURCE
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/resource.h>
#include <unistd.h>
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define HAVE_AVX512 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_VNNI 1
#elif defined(__AVXVNNI__)
#define HAVE_AVXVNNI 1
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* fully unrolled small loops keep the accumulator arrays in registers */
#define UNROLL _Pragma("GCC unroll 8")

/* the instruction set the products were compiled for (for tests and the bench's machine line) */
const char *kernel_isa(void) {
#if defined(HAVE_AVX512) && defined(HAVE_VNNI)
    return "avx512-vnni";
#elif defined(HAVE_AVX512)
    return "avx512";
#elif defined(__AVX2__) && defined(HAVE_AVXVNNI)
    return "avx2-vnni";
#elif defined(__AVX2__)
    return "avx2";
#else
    return "scalar";
#endif
}

/* ------------------------------------------------------------------------------------ the thread pool */

#define MAX_THREADS 256
typedef void (*ChunkFn)(void *ctx, int64_t lo, int64_t hi); /* does items [lo, hi) of a job */

/* A run of chunks owned by one thread: the next chunk to take from the front (low 32 bits) and the end of the
 * run (high 32), in one word so that the owner (fetch_add on the front) and a thief (compare-exchange on the
 * end) never both get the same chunk. A claim is valid when front < end in the value it replaced. */
typedef struct {
    _Alignas(64) _Atomic uint64_t run;
    char pad[64 - sizeof(uint64_t)];
} Run;

static struct {
    pthread_mutex_t busy;   /* one parallel job at a time; a second caller (another Python thread) runs inline */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    _Atomic uint64_t seq;   /* bumped for every job: what idle threads wait on */
    _Atomic int sleeping;   /* threads blocked on `wake` */
    _Atomic int active;     /* threads taking part in the current job (workers with a higher id sit out) */
    int workers;            /* threads started (ids 1..workers; the caller is 0) */
    int threads;            /* threads a job may use, caller included */
    int explicit_threads;   /* set by the user (--threads, OMP_NUM_THREADS): used for every job */
    int64_t spin_ns;        /* how long an idle thread spins before it sleeps (BABYLLAMA_SPIN_US); -1: spin_limit */
    _Atomic int caller_cpu; /* the CPU the current job was published from (Linux; else -1) */
    _Atomic int64_t shared_looks; /* looks at a worker's preemptions that found its CPU shared (read by tests) */
    /* the current job: written before its runs are published, read only after a successful claim */
    ChunkFn fn;
    void *ctx;
    int64_t n_items, chunk;
    _Atomic int64_t done;   /* chunks finished */
    int64_t split_jobs;     /* jobs run on more than one thread (read by tests) */
    int64_t sleeps;         /* times an idle thread went to sleep (read by tests; under sleep_lock) */
    Run runs[MAX_THREADS];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 1, 0,
          -1, -1, 0, NULL, NULL, 0, 1, 0, 0, 0, {{0}}};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int claim_front(int r, int64_t *chunk) {
    uint64_t v = atomic_fetch_add_explicit(&pool.runs[r].run, 1, memory_order_acq_rel);
    uint32_t front = (uint32_t)v, end = (uint32_t)(v >> 32);
    *chunk = front;
    return front < end;
}

static int claim_back(int r, int64_t *chunk) {
    uint64_t v = atomic_load_explicit(&pool.runs[r].run, memory_order_acquire);
    for (;;) {
        uint32_t front = (uint32_t)v, end = (uint32_t)(v >> 32);
        if (front >= end) return 0;
        uint64_t taken = ((uint64_t)(end - 1) << 32) | front;
        if (atomic_compare_exchange_weak_explicit(&pool.runs[r].run, &v, taken, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            *chunk = end - 1;
            return 1;
        }
    }
}

static void run_chunk(int64_t c) {
    int64_t lo = c * pool.chunk, hi = lo + pool.chunk < pool.n_items ? lo + pool.chunk : pool.n_items;
    pool.fn(pool.ctx, lo, hi);
}

/* thread `self`'s part of the current job: its own run front to back, then the others' from their ends; the
 * chunks it ran are counted done once, at the end (a count per chunk bounced the counter's cache line between
 * the cores thousands of times a token) */
static void take_part(int self, int n_runs) {
    int64_t c, ran = 0;
    if (self < n_runs)
        while (claim_front(self, &c)) run_chunk(c), ran++;
    for (int k = 1; k < n_runs; k++)
        while (claim_back((self + k) % n_runs, &c)) run_chunk(c), ran++;
    if (ran) atomic_fetch_add_explicit(&pool.done, ran, memory_order_release);
}

static int64_t spin_limit(void);
#define SPIN_NS 500000LL
#define SHORT_SPIN_NS 50000LL

/* A worker's CPU is shared with other busy work when the OS keeps preempting the worker for long: a co-runner's
 * turn on the core lasts a millisecond or more, a kernel thread's or a terminal's (reading the output) tens of
 * microseconds. There a long spin uses up the worker's share of the core and the next job finds it preempted, so
 * it spins short (SHORT_SPIN_NS) while two preemptions of over LONG_PREEMPTION_NS each (on average between two
 * looks) fall within SHARED_MEMORY_NS. One is not enough: an idle machine's housekeeping preempts a worker for a
 * few milliseconds now and then (docs/speed.md). A worker looks when it wakes (to start counting), SHORT_SPIN_NS
 * into a longer spin and before it sleeps: a few system calls per decode step. Linux only (RUSAGE_THREAD); where
 * the count is missing no CPU is taken for shared. */
#define LONG_PREEMPTION_NS 500000LL
#define SHARED_MEMORY_NS 200000000LL

typedef struct { int64_t wall, cpu, voluntary, involuntary; } Usage;
static _Thread_local Usage watched;        /* at the last look */
static _Thread_local int64_t long_preemptions[2] = {INT64_MIN / 2, INT64_MIN / 2}; /* when: the latest first */

static Usage usage_now(void) {
    Usage u = {now_ns(), 0, 0, 0};
#if defined(__linux__) && defined(RUSAGE_THREAD)
    struct rusage ru;
    struct timespec cpu;
    if (getrusage(RUSAGE_THREAD, &ru) == 0 && clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu) == 0) {
        /* the CPU time from the clock: getrusage's lags by up to a scheduler tick */
        u.cpu = (int64_t)cpu.tv_sec * 1000000000 + cpu.tv_nsec;
        u.voluntary = ru.ru_nvcsw, u.involuntary = ru.ru_nivcsw;
    }
#endif
    return u;
}

/* whether this thread's CPU is shared, after counting the long preemptions since the last look (none where it
 * slept in between: its time off the CPU is then mostly the sleep) */
static int cpu_shared(void) {
    Usage u = usage_now();
    int64_t preempted = u.involuntary - watched.involuntary, off_cpu = (u.wall - watched.wall) - (u.cpu - watched.cpu);
    if (u.voluntary == watched.voluntary && preempted > 0 && off_cpu > preempted * LONG_PREEMPTION_NS) {
        long_preemptions[1] = long_preemptions[0];
        long_preemptions[0] = u.wall;
    }
    watched = u;
    int shared = u.wall - long_preemptions[1] < SHARED_MEMORY_NS;
    if (shared) atomic_fetch_add_explicit(&pool.shared_looks, 1, memory_order_relaxed);
    return shared;
}

static uint64_t wait_for_job(uint64_t seen) {
    int64_t start = now_ns();
    int looked = 0, shared = 0;
    for (int i = 1;; i++) {
        uint64_t s = atomic_load_explicit(&pool.seq, memory_order_acquire);
        if (s != seen) return s;
        if (i % 256 == 0) {
            int64_t spun = now_ns() - start, limit = spin_limit();
            if (!looked && spun > SHORT_SPIN_NS && limit > SHORT_SPIN_NS && pool.spin_ns < 0)
                looked = 1, shared = cpu_shared();
            if (spun > (shared ? SHORT_SPIN_NS : limit)) break;
        }
        cpu_relax();
    }
    cpu_shared(); /* the jobs since the last look, before a sleep hides their preemptions */
    pthread_mutex_lock(&pool.sleep_lock);
    pool.sleeps++;
    atomic_fetch_add(&pool.sleeping, 1); /* seq_cst with the publisher's seq bump: no lost wake-up */
    uint64_t s;
    while ((s = atomic_load(&pool.seq)) == seen) pthread_cond_wait(&pool.wake, &pool.sleep_lock);
    atomic_fetch_sub(&pool.sleeping, 1);
    pthread_mutex_unlock(&pool.sleep_lock);
    watched = usage_now();
    return s;
}

#if defined(__linux__)
/* Move the calling worker off `cpu`, the caller's. With as many busy threads as CPUs (a co-runner beside two
 * threads on two cores) the OS often puts a woken worker on the CPU of the thread that woke it, and keeps it there
 * for tens to hundreds of milliseconds: the two then take turns on one core, the caller runs slower than alone and
 * the worker hardly ever runs, while the co-runner has the other core to itself (docs/speed.md). */
static void leave_cpu(int cpu, const cpu_set_t *started) {
    /* The CPUs it may go to: those it started with that the process still has, as its main thread's mask says
     * (what `taskset -p` shows and sets): a process narrowed after the worker started stays narrowed. */
    cpu_set_t others;
    if (cpu < 0 || cpu >= CPU_SETSIZE || sched_getaffinity(getpid(), sizeof others, &others) != 0) return;
    CPU_AND(&others, &others, started);
    CPU_CLR(cpu, &others);
    if (CPU_COUNT(&others) > 0) pthread_setaffinity_np(pthread_self(), sizeof others, &others);
}
#endif

static void *worker(void *arg) {
    int self = (int)(intptr_t)arg;
    uint64_t seen = atomic_load(&pool.seq);
#if defined(__linux__)
    cpu_set_t started; /* the CPUs the worker started with: it leaves the caller's among them */
    int can_move = pthread_getaffinity_np(pthread_self(), sizeof started, &started) == 0 && CPU_COUNT(&started) > 1;
#endif
    for (;;) {
        seen = wait_for_job(seen);
#if defined(__linux__)
        int caller = atomic_load_explicit(&pool.caller_cpu, memory_order_relaxed);
        if (can_move && sched_getcpu() == caller) leave_cpu(caller, &started);
#endif
        int active = atomic_load_explicit(&pool.active, memory_order_relaxed);
        if (self < active) take_part(self, active);
    }
    return NULL;
}

/* start workers up to threads - 1 (signals stay with the caller's threads) */
static void start_workers(int threads) {
    if (pool.workers >= threads - 1) return;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (pool.workers < threads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, worker, (void *)(intptr_t)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break; /* fewer threads: the caller takes the chunks nobody claims */
        pool.workers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* a forked child has none of the parent's workers */
static void after_fork_in_child(void) {
    pool.workers = 0;
    atomic_store(&pool.sleeping, 0);
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
}

static void adapt_after_fork(void);

static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, after_fork_in_child);
    pthread_atfork(NULL, NULL, adapt_after_fork);
}

/* Thread count for later jobs: `threads` (caller included, capped at MAX_THREADS); `explicit_threads`: the
 * user asked for it, so every job splits (else jobs below PARALLEL_MIN_BYTES stay on the caller's thread).
 * spin_us: how long idle threads spin before they sleep; negative: as spin_limit decides. */
void pool_configure(int threads, int explicit_threads, int spin_us) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    pool.threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    pool.explicit_threads = explicit_threads;
    pool.spin_ns = spin_us < 0 ? -1 : (int64_t)spin_us * 1000;
}

int kernel_threads(void) { return pool.threads; }

int64_t pool_split_jobs(void) { return pool.split_jobs; }

int64_t pool_shared_looks(void) { return atomic_load(&pool.shared_looks); }

int64_t pool_sleeps(void) {
    pthread_mutex_lock(&pool.sleep_lock);
    int64_t n = pool.sleeps;
    pthread_mutex_unlock(&pool.sleep_lock);
    return n;
}

/* Work below these sizes stays on one thread unless threads were set explicitly: waking a second thread and
 * sharing the result costs more than it saves (see docs/speed.md). Products are sized by their multiply-adds
 * (weights x tokens), whatever the format, and split from 32 K of them as the adaptation decides (the built-in
 * model's layer products are 45-90 K, and on one thread such products are most of a small model's step).
 * Other work (bytes of weights, or of keys and values): from PARALLEL_MIN_BYTES. A decode step's attention
 * splits from ATTENTION_MIN_BYTES where it runs between products on the pool (forward_layers), while the other
 * threads still spin, so splitting it costs little, while on one thread even a short context's attention is a
 * noticeable share of the step (docs/speed.md). */
#define PRODUCT_MIN_MACS (32 * 1024)
#define PARALLEL_MIN_BYTES (512 * 1024)
#define ATTENTION_MIN_BYTES (64 * 1024)

/* Run fn over items [0, n_items) in chunks of `chunk` items on up to `threads` threads (the caller included)
 * and return when every chunk is done. */
static void pool_run_on(int threads, ChunkFn fn, void *ctx, int64_t n_items, int64_t chunk) {
    int64_t n_chunks = (n_items + chunk - 1) / chunk;
    if (threads > n_chunks) threads = (int)n_chunks;
    if (threads <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        fn(ctx, 0, n_items);
        return;
    }
    start_workers(threads);
    if (threads > pool.workers + 1) threads = pool.workers + 1;
    if (threads <= 1) {
        pthread_mutex_unlock(&pool.busy);
        fn(ctx, 0, n_items);
        return;
    }
    pool.split_jobs++;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_items = n_items;
    pool.chunk = chunk;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    for (int r = 0; r < threads; r++) {
        uint64_t lo = (uint64_t)(n_chunks * r / threads), hi = (uint64_t)(n_chunks * (r + 1) / threads);
        atomic_store_explicit(&pool.runs[r].run, (hi << 32) | lo, memory_order_release);
    }
    atomic_store_explicit(&pool.active, threads, memory_order_relaxed);
#if defined(__linux__)
    atomic_store_explicit(&pool.caller_cpu, sched_getcpu(), memory_order_relaxed);
#endif
    atomic_fetch_add(&pool.seq, 1);
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    take_part(0, threads);
    /* every chunk is claimed now: wait for the ones other threads still run (yielding, after a while, so that
     * a worker preempted on this core gets it back) */
    for (int i = 1; atomic_load_explicit(&pool.done, memory_order_acquire) < n_chunks; i++) {
        if (i > 2000) sched_yield();
        else cpu_relax();
    }
    pthread_mutex_unlock(&pool.busy);
}

/* Without an explicit thread count the pool adapts to the machine: a busy one (another process on a core) can make
 * every thread but the caller's a liability, an idle one rewards them all. Products alternate between measuring
 * (PROBE_JOBS jobs on the caller's thread alone, then as many on every thread, comparing bytes per second) and running
 * the faster way for EXPLOIT_JOBS jobs (about 40 decode steps of a 110M model), so a change of load is followed within
 * a second (see the guard and the back-off below) and an idle machine pays about 1% for the measuring. A phase also
 * lasts PROBE_NS (EXPLOIT_NS) of its jobs' time, so that one preemption does not decide, and ends where a decode step
 * (forward_step) begins, so that both measured phases hold whole steps: a small model's products differ several-fold in
 * bytes per second (the classifier from memory, the layers from cache), and windows cut mid-step would compare
 * different mixes of them (products outside decode steps end a phase after 4 x its jobs). Every thread is measured
 * second, and only until it is clearly losing (a quarter slower than one thread over LOSING_JOBS jobs and
 * PROBE_NS / 4): on a busy machine a job split across threads can wait milliseconds for a preempted one, and a whole
 * phase of that can be a large part of a small model's first 256 tokens. Unless it loses, the all-threads phase lasts
 * PROBE_ALL_NS, longer than the OS gives a thread at a time beside a co-runner: a phase as short as the one-thread one
 * can fall wholly in a stretch where the co-runner is off the worker's core, win, and then run every thread for 100 ms
 * of waits (with 2 ms, busy runs fall well under one thread's speed; see docs/speed.md).
 * The all-threads phase's first job wakes the threads the one-thread phase let sleep: it is not timed.
 * A measurement compares products of one token count only (that of its first job): per byte of weights a
 * product of several tokens takes longer than one of a single token, and not in proportion, so a prompt's
 * step measured on every thread against the decode steps after it on one would decide by what ran, not by how. Jobs
 * of another count pass unrecorded, and PROBE_JOBS of them in a row start the measurement again on theirs
 * (a prompt's products are not measured at all: MEASURED_MAX_TOKENS).
 * A process opens with a phase on every thread as short as a probe: with nothing measured yet, its first
 * prompt would otherwise run on the caller's thread alone (twice as long on an idle machine), and a busy
 * machine pays for the opening no more than for a probe of every thread.
 * Running every thread by choice is checked as it goes (the guard): once its jobs of the measured count hold
 * GUARD_NS, at each step's start, if they have moved fewer bytes per second than GUARD_SHARE of what the
 * caller's thread alone moved in the probe, the rest of the phase runs on the caller's thread. A worker woken
 * after sleeping through a one-thread phase is favoured by the scheduler for its first milliseconds beside a
 * co-runner, so an 8 ms probe can win where the 100 ms after it run at about two thirds of one thread
 * (docs/speed.md). An idle machine's all-thread jobs stay well above the one-thread rate (memory-bound models the
 * least), clear of the guard.
 * Phases that end on the caller's thread alone back off: each one in a row runs twice as long as the one
 * before, up to 8x (800 ms), so a machine that stays busy is probed a few times a second rather than ten, and
 * an idle one is found again within a second. Phases on every thread after probes they won by CLEAR_WIN or more
 * back off the same way, the guard watching over them: each probe runs a whole step on the caller's thread
 * alone, which costs an idle machine a few percent with a probe every 100 ms, backed off under 1%
 * (docs/speed.md). A guard that fires ends the back-off, so the phase it cuts short lasts no longer than an
 * unbacked one. */
#define PROBE_JOBS 48
#define PROBE_NS 2000000LL      /* 2 ms */
#define PROBE_ALL_NS 8000000LL  /* 8 ms: the all-threads phase, unless it loses first */
#define LOSING_JOBS 8
#define EXPLOIT_JOBS 2048
#define EXPLOIT_NS 100000000LL  /* 100 ms */
#define GUARD_NS 16000000LL     /* 16 ms */
#define GUARD_SHARE 0.85
#define MAX_BACKOFF 3           /* phases of one choice in a row run up to 2^3 times as long */
#define CLEAR_WIN 1.1           /* every thread's probe over one thread's from which its phases back off */

static struct {
    pthread_mutex_t lock;
    int phase;          /* 0: measuring one thread, 1: measuring all, 2: running `choice` */
    int opening;        /* the first phase 2, before anything was measured: as short as a probe */
    int choice;         /* 1: all threads, 0: the caller's alone */
    int64_t jobs;       /* jobs in this phase */
    int64_t phase_ns;   /* their time */
    int64_t last_step;  /* steps_begun at the last recorded job */
    int64_t tokens;     /* the token count of the products being measured */
    int64_t others;     /* jobs of another count passed since the last one of `tokens` */
    double ns[2], bytes[2];
    double guard_ns, guard_bytes; /* this phase's jobs of `tokens` run on every thread by choice */
    int single_streak;  /* phases in a row that ended running on the caller's thread alone */
    int multi_streak;   /* phases in a row on every thread after clear wins, the guard silent */
} adapt = {PTHREAD_MUTEX_INITIALIZER, 2, 1, 1, 0, 0, 0, 0, 0, {0, 0}, {0, 0}, 0, 0, 0, 0};
static _Atomic int64_t steps_begun; /* forward_step calls: phases end where a step begins */

static void adapt_after_fork(void) { pthread_mutex_init(&adapt.lock, NULL); }

static int adapt_mode(void) { return adapt.phase == 0 ? 0 : adapt.phase == 1 ? 1 : adapt.choice; }

/* How long an idle thread spins before it sleeps, unless set (BABYLLAMA_SPIN_US). Where the adaptation runs products on
 * every thread, and where threads were set explicitly, SPIN_NS: longer than the gap between two decode steps (the
 * Python between them takes 50-200 us), so that the next step's first products find the threads awake: with a
 * shorter spin a worker sleeps between steps and wakes late for the next one (docs/speed.md); but SHORT_SPIN_NS on a
 * worker whose CPU is shared (cpu_shared), where a long spin uses up its share of the core and the next job finds it
 * preempted. SHORT_SPIN_NS where the adaptation runs products on the caller's thread alone or measures that (a busy
 * machine: the worker should give its core back soon). */
static int64_t spin_limit(void) {
    if (pool.spin_ns >= 0) return pool.spin_ns;
    return pool.explicit_threads || adapt_mode() == 1 ? SPIN_NS : SHORT_SPIN_NS;
}

int64_t pool_spin_us(void) { return spin_limit() / 1000; } /* read by tests */

static void adapt_record(int multi, int64_t n_tok, int64_t bytes, int64_t ns) {
    if (pthread_mutex_trylock(&adapt.lock) != 0) return; /* another caller records: skip this one */
    if (adapt.phase < 2) {
        if (adapt.phase == 0 && adapt.jobs == 0) adapt.tokens = n_tok;
        if (n_tok != adapt.tokens) {
            if (++adapt.others < PROBE_JOBS) {
                pthread_mutex_unlock(&adapt.lock);
                return;
            }
            adapt.phase = 0; /* measure again, on this count */
            adapt.jobs = adapt.phase_ns = 0;
            adapt.tokens = n_tok;
            adapt.ns[0] = adapt.ns[1] = adapt.bytes[0] = adapt.bytes[1] = 0;
        }
        adapt.others = 0;
        if (adapt.phase == 1 && adapt.jobs == 0) { /* it woke the threads the phase before let sleep: not timed */
            adapt.jobs++;
            pthread_mutex_unlock(&adapt.lock);
            return;
        }
        adapt.ns[multi] += (double)ns; /* by how the job ran: the phase may have changed since it started */
        adapt.bytes[multi] += (double)bytes;
    }
    adapt.phase_ns += ns;
    int64_t step = atomic_load_explicit(&steps_begun, memory_order_relaxed);
    int exploit = adapt.phase == 2 && !adapt.opening;
    int streak = adapt.choice ? adapt.multi_streak : adapt.single_streak;
    int backoff = exploit ? (streak < MAX_BACKOFF ? streak : MAX_BACKOFF) : 0;
    int64_t limit = exploit ? EXPLOIT_JOBS << backoff : PROBE_JOBS;
    int new_step = step != adapt.last_step;
    adapt.last_step = step;
    int losing = adapt.phase == 1 && adapt.jobs >= LOSING_JOBS && adapt.phase_ns >= PROBE_NS / 4 &&
                 1.25 * adapt.bytes[1] * adapt.ns[0] < adapt.bytes[0] * adapt.ns[1];
    if (exploit && adapt.choice && multi && n_tok == adapt.tokens) { /* the guard (see above) */
        adapt.guard_ns += (double)ns;
        adapt.guard_bytes += (double)bytes;
        if (adapt.guard_ns >= GUARD_NS && new_step &&
            adapt.guard_bytes * adapt.ns[0] < GUARD_SHARE * adapt.bytes[0] * adapt.guard_ns)
            adapt.choice = 0; /* the phase's back-off is then one-thread phases', and its streak ends below */
    }
    int64_t min_ns = exploit ? EXPLOIT_NS << backoff : adapt.phase == 1 ? PROBE_ALL_NS : PROBE_NS;
    if ((++adapt.jobs >= limit && adapt.phase_ns >= min_ns &&
         (new_step || adapt.jobs >= 4 * limit)) || losing) {
        if (adapt.phase == 1) adapt.choice = adapt.bytes[1] / adapt.ns[1] >= adapt.bytes[0] / adapt.ns[0];
        if (adapt.phase == 2) { /* the probes' rates are still those the choice was made on */
            int clear_win = adapt.bytes[1] / adapt.ns[1] >= CLEAR_WIN * adapt.bytes[0] / adapt.ns[0];
            adapt.single_streak = adapt.choice ? 0 : adapt.single_streak + 1;
            adapt.multi_streak = adapt.choice && clear_win && !adapt.opening ? adapt.multi_streak + 1 : 0;
            adapt.ns[0] = adapt.ns[1] = adapt.bytes[0] = adapt.bytes[1] = 0;
        }
        adapt.opening = 0;
        adapt.phase = (adapt.phase + 1) % 3;
        adapt.jobs = adapt.phase_ns = 0;
        adapt.guard_ns = adapt.guard_bytes = 0;
    }
    pthread_mutex_unlock(&adapt.lock);
}

/* for tests only (tests/test_kernels.py; the package binds neither hook): one job's record as pool_run_adaptive
 * makes it (new_step: a decode step began before it), and the state it leaves: phase, choice, single_streak,
 * opening, how the next job runs (adapt_mode), multi_streak */
void adapt_test_record(int multi, int64_t n_tok, int64_t bytes, int64_t ns, int new_step) {
    if (new_step) atomic_fetch_add_explicit(&steps_begun, 1, memory_order_relaxed);
    adapt_record(multi, n_tok, bytes, ns);
}

/* for tests only (not bound by the package): the adaptation's state, as above */
void adapt_test_state(int64_t *out) {
    out[0] = adapt.phase, out[1] = adapt.choice, out[2] = adapt.single_streak, out[3] = adapt.opening;
    out[4] = adapt_mode(), out[5] = adapt.multi_streak;
}

/* Run fn over items [0, n_items) as the configuration says: on the threads set explicitly; else on one thread
 * for work too small to `split`, and on all threads or one as the adaptation finds faster (products only:
 * `adaptive` is their token count; 0 for other work, which follows the last choice made, all threads before
 * the first: a prompt's sgemm and a step's attention are not measured, and following the measuring phases
 * would put a prompt on one thread until decode steps move the measuring on). */
static void pool_run_adaptive(ChunkFn fn, void *ctx, int64_t n_items, int64_t chunk, int64_t work_bytes,
                              int64_t adaptive, int split) {
    if (pool.explicit_threads || pool.threads == 1) {
        pool_run_on(pool.threads, fn, ctx, n_items, chunk);
        return;
    }
    if (!split) {
        fn(ctx, 0, n_items);
        return;
    }
    int multi = adaptive ? adapt_mode() : adapt.choice;
    int64_t start = adaptive ? now_ns() : 0;
    pool_run_on(multi ? pool.threads : 1, fn, ctx, n_items, chunk);
    if (adaptive) adapt_record(multi, adaptive, work_bytes, now_ns() - start);
}

static void pool_run(ChunkFn fn, void *ctx, int64_t n_items, int64_t chunk, int64_t work_bytes) {
    pool_run_adaptive(fn, ctx, n_items, chunk, work_bytes, 0, work_bytes >= PARALLEL_MIN_BYTES);
}

/* --------------------------------------------------------------------------------------- fp16, types */

static inline float fp16_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000 | (man << 13); /* inf, nan */
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else { /* subnormal: normalize */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* f32 -> fp16, rounded to nearest even (as NumPy's float16 conversion rounds): F16C's vcvtps2ph where the CPU
 * has it, else the same rounding in integer arithmetic (NaN stays a quiet NaN, overflow becomes infinity) */
static inline uint16_t f32_to_fp16(float f) {
#ifdef __F16C__
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    uint32_t x, sign;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000;
    x &= 0x7fffffff;
    if (x >= 0x47800000) /* |f| >= 65536, inf, nan */
        return sign | (x > 0x7f800000 ? 0x7e00 | ((x >> 13) & 0x3ff) : 0x7c00);
    if (x < 0x38800000) { /* below 2^-14: a subnormal half (or zero), rounded by a float addition that
                             puts the half's last bit at the float's last one */
        float magic, sum;
        uint32_t magic_bits = 126u << 23, bits;
        memcpy(&magic, &magic_bits, 4);
        memcpy(&sum, &x, 4);
        sum += magic;
        memcpy(&bits, &sum, 4);
        return sign | (uint16_t)(bits - magic_bits);
    }
    /* normal: rebias the exponent, add just under half a unit of the kept mantissa plus its last bit (ties
     * to even), truncate; a carry out of the mantissa rounds up to the next exponent (65520 and up: inf) */
    x += ((uint32_t)(15 - 127) << 23) + 0xfff + ((x >> 13) & 1);
    return sign | (uint16_t)(x >> 13);
#endif
}

static inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* W_F16, W_BF16: fp32 weights stored as IEEE halves (an F16 GGUF's tensors, as the file holds them) or as
 * bfloat16 (a BF16 GGUF's or Hugging Face checkpoint's). The fp32 kernels read them, converting each weight to
 * fp32 (exactly) as they load it, and sum in their own order: such a matrix gives bit for bit what the fp32
 * matrix of its converted values gives, from half the bytes. */
enum { W_F32 = 0, W_Q8 = 1, W_Q8_0 = 2, W_Q4_0 = 3, W_Q4_0R = 4, W_Q8_0R = 5, W_F16 = 6, W_BF16 = 7, W_Q8R = 8 };
#define BLOCK 32
static const int64_t BLOCK_BYTES[9] = {0, 0, 2 + BLOCK, 2 + BLOCK / 2, 2 + BLOCK / 2, 2 + BLOCK, 0, 0, 0};
static inline int is_dense(int type) { return type == W_F32 || type == W_F16 || type == W_BF16; }

/* Q4_0R, Q8_0R: Q4_0 or Q8_0 rows with each row's bytes regrouped for the SIMD kernels (regroup_blocks; the
 * same bytes per block). A row's blocks go in groups of G = 16 while 16 are left, then at most one group of 8
 * and one of 4, and its last 0-3 blocks stay as they are (G = 1). A group of G blocks is `words` vectors of 4G
 * bytes (Q4_0R: 4, its 16 bytes of nibbles; Q8_0R: 8, its 32 values), vector j holding bytes 4j..4j+3 of block
 * l's in its 4-byte lane l, then the G blocks' fp16 scales: one vpdpbusd on a vector sums four products of each
 * of G blocks into the block's own int32 lane, with no byte permutes. */
static inline int rg_group(int64_t left) { return left >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : 1; }

/* Q8R: a Q8 row (runq.c's groups of gs = 32 or 64, .bin version 2) regrouped like a Q8_0R one: its values cut
 * into blocks of 32 and grouped as Q8_0R's (groups of 16, 8 and 4 blocks, vector j of a group holding values
 * 4j..4j+3 of each of its blocks), each group followed by the fp32 scales of its G / per groups of gs (per =
 * gs / 32), so that a group of G blocks is G * (32 + 4 / per) bytes (per 2: 34G, Q8_0R's size). The last 0-3
 * blocks stay as they are: per block its values, then its scale (gs 32); per pair its 64 values, then their
 * scale (gs 64). The Q8_0R kernels run it, reading its fp32 scales where Q8_0R's fp16 ones are: runq.c's layout
 * takes two shuffles, a scale permute and a conversion more per 128 bytes. The scales go with the values: kept
 * in their own array, a second stream per row, the packed values read DRAM slower than runq.c's layout, and
 * after each group faster (docs/speed.md). */

/* where the values and the scale of a Q8R row's block g lie when it is past the row's groups (per: blocks per
 * group scale; per 0: a plain Q8_0 block) */
static inline void rg_single(const uint8_t *row, int per, int64_t g, const uint8_t **values, const uint8_t **scale) {
    if (per == 0) {
        *scale = row + g * 34, *values = *scale + 2;
    } else if (per == 1) {
        *values = row + g * 36, *scale = *values + BLOCK;
    } else {
        const uint8_t *pair = row + (g & ~(int64_t)1) * 34;
        *values = pair + (g & 1) * BLOCK, *scale = pair + 2 * BLOCK;
    }
}

static inline float load_f32(const uint8_t *p) {
    float v;
    memcpy(&v, p, 4);
    return v;
}

/* 4-byte words per block of a regrouped type (or of the blocks it came from) */
static inline int rg_words(int type) { return type == W_Q4_0R || type == W_Q4_0 ? 4 : 8; }

/* The interleave both sides of a regrouped product share: `words` 4-byte words of each of G blocks (`stride`
 * bytes apart in `plain`), word v of block l at 4G·v + 4l in `packed`. */
static void rg_interleave(uint8_t *packed, const uint8_t *plain, int64_t G, int words, int64_t stride) {
    for (int v = 0; v < words; v++)
        for (int64_t l = 0; l < G; l++) {
            memcpy(packed + 4 * G * v + 4 * l, plain + l * stride + 4 * v, 4);
        }
}

/* block l's `words` words out of the interleaved group of G blocks at `at` (rg_interleave's inverse) */
static void rg_gather(const uint8_t *at, int64_t G, int64_t l, int words, uint8_t *out) {
    for (int v = 0; v < words; v++) memcpy(out + 4 * v, at + 4 * G * v + 4 * l, 4);
}

/* lane l of the regrouped group of G blocks at `at` (blocks of `words` words) as the block's bytes: its scale,
 * then its nibbles or values */
static void rg_lane(const uint8_t *at, int64_t G, int64_t l, int words, uint8_t *out) {
    if (G == 1) {
        memcpy(out, at, 2 + 4 * words);
        return;
    }
    memcpy(out, at + 4 * words * G + 2 * l, 2);
    rg_gather(at, G, l, words, out + 2);
}

/* block b of a regrouped row of n weights as its block's bytes (plain C builds, which have no regrouped
 * kernels) */
static void rg_block(const uint8_t *row, int64_t n, int64_t b, int type, uint8_t *out) {
    int64_t nb = n / BLOCK, b0 = 0, G = rg_group(nb);
    for (; b0 + G <= b; G = rg_group(nb - b0)) b0 += G;
    rg_lane(row + b0 * BLOCK_BYTES[type], G, b - b0, rg_words(type), out);
}

/* the correction that starts a Q4_0 block's int32 sum: the weights' unsigned nibbles q stand for q - 8, so
 * -8 * (sum of the block's 32 activation values) */
static inline int32_t q4_correction(const int8_t *x) {
    int32_t sum = 0;
    for (int k = 0; k < BLOCK; k++) sum += x[k];
    return -8 * sum;
}

typedef struct {
    const void *w;      /* F32: fp32 (rows, n); Q8: int8 (rows, n); Q8_0/Q4_0: blocks, rows one after another */
    const float *s;     /* Q8: scales (rows, n / gs); else unused */
    int64_t rows;
    int64_t row0;       /* rows of the matrices before it in the call: its (n_tok, rows) result starts at
                         * out + n_tok * row0 */
    int32_t type;       /* W_* */
    int32_t gs;         /* Q8: group size; Q8_0/Q4_0: 32; F32: 0 */
} Mat;

static int64_t row_bytes(const Mat *m, int64_t n) {
    switch (m->type) {
    case W_F32: return 4 * n;
    case W_F16: case W_BF16: return 2 * n;
    case W_Q8: case W_Q8R: return n + 4 * (n / m->gs);
    default: return n / BLOCK * BLOCK_BYTES[m->type];
    }
}

#if defined(HAVE_AVX512) && defined(HAVE_VNNI) && defined(__AVX512VBMI__)
/* AVX-512 with VNNI and VBMI's byte permutes: block weights are gathered out of their 18- or 34-byte blocks
 * several at a time into 512-bit registers (Ice Lake, Zen 4 and later) */
#define HAVE_ZMM_INT8 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
/* AMX's int8 tiles (Sapphire Rapids-class Xeons and later) for products of many tokens: see amx_rows */
#define HAVE_AMX 1
#include <sys/syscall.h>
#endif
#define Q4_GROUP 4 /* Q4_0 blocks per step */
#define Q4_D_COPIES 2 /* copies of a step's activation scales in the layout */
#else
#define Q4_GROUP 2
#define Q4_D_COPIES 1
#endif

/* Quantized activations: values (n_tok, n) and scales (n_tok, n / gs), and the layouts the SIMD kernels read,
 * made once per call for every row of every matrix:
 *  - Q4_0 (blocks of 32, Q4_GROUP blocks a step): per token and step, the values that meet the step's low
 *    nibbles (each block's first 16), then those that meet the high ones (the last 16), the blocks interleaved
 *    4 bytes at a time so that int32 lane l of a step's sums belongs to block l % Q4_GROUP; per block a
 *    correction -8 * (sum of its values), which starts its sum so that the weights' unsigned nibbles q stand
 *    for q - 8, and its scale (AVX-512: each step's Q4_GROUP scales twice, so that two steps' sums folded into
 *    one register, see dots_q4_simd, meet theirs in one load). Steps past the last block are zero.
 *  - Q8 types with AVX-512 (a weight w is read as the unsigned byte w + 128): a correction of
 *    -128 * (sum of the group's values): runq.c's groups one each; llama.cpp's Q8_0 blocks, two a step, in
 *    lanes 0 and 8 of 16, with each block's scale repeated over its 8 lanes; for groups of 64 each scale
 *    repeated over 8 lanes (two groups' folded sums, see dots_q8_g64_simd). runq.c's groups of 32 (c32, d32):
 *    per four groups 16 corrections (lanes 0, 4, 8, 12) and 16 scales, each over the 4 lanes of its group. */
typedef struct {
    int64_t gs;
    int8_t *q;
    float *d;
    int64_t q4_stride, c4_stride, d4_stride, c8_stride, d8_stride; /* per token: bytes of q4, entries of the rest */
    int8_t *q4;
    int32_t *c4, *c8;
    float *d4, *d8;
    int64_t c32_stride, d32_stride; /* runq.c's groups of 32 (AVX-512): per token, entries of c32, d32 */
    int32_t *c32;
    float *d32;
    int8_t *q16;  /* Q4_0R, Q8_0R: per token its n values in the weights' groups (see W_Q4_0R) */
    int32_t *c16; /* and per block -8 * (sum of its values) (Q8_0R's AVX-512 kernel starts at 16 times it) */
    int8_t *xb;   /* AMX (amx_rows): per 16 tokens and block, the tokens' values as a B tile (see amx_lay_out) */
    float *xdb;   /* and per 16 tokens and block, the 16 tokens' scales of the block */
    int64_t prefetch; /* bytes ahead the rows prefetch their weights (0: none), as the call chose */
} QAct;

/* a group's scale, max |v| / 127, for gs values v */
static inline float group_scale(const float *v, int64_t gs) {
    float amax = 0.0f;
    /* a vectorized max reduction (exact in any order) instead of fmaxf, which the compiler calls out of line
     * for its NaN rule (no different here: amax is never NaN, and a NaN value is skipped either way) */
#pragma omp simd reduction(max : amax)
    for (int64_t k = 0; k < gs; k++) amax = fabsf(v[k]) > amax ? fabsf(v[k]) : amax;
    return amax / 127.0f;
}

/* quantize rows x (n_tok, n) per group of gs: int8 values xq and scales xs (n_tok, n / gs) */
static void quantize_q8(const float *x, int64_t n_tok, int64_t n, int64_t gs, int8_t *xq, float *xs) {
    for (int64_t g = 0; g < n_tok * (n / gs); g++) {
        const float *v = x + g * gs;
        float scale = group_scale(v, gs), safe = scale != 0.0f ? scale : 1.0f;
        xs[g] = scale;
        /* rintf: ties to even, like NumPy's reference (runq.c's roundf rounds ties away from zero) */
        for (int64_t k = 0; k < gs; k++) xq[g * gs + k] = (int8_t)rintf(v[k] / safe);
    }
}

/* out (n_tok, n) = x quantized per group of gs and back (value times scale): the rounding runq.c's products
 * give x, for a prompt's products in fp32 sgemm. rintf(v / safe) is the int8 value itself (an integer within
 * +-127), so it is scaled as it is, group by group in vectors. */
void round_q8(const float *x, int64_t n_tok, int64_t n, int64_t gs, float *out) {
    for (int64_t g = 0; g < n_tok * (n / gs); g++) {
        const float *v = x + g * gs;
        float *o = out + g * gs;
        float scale = group_scale(v, gs), safe = scale != 0.0f ? scale : 1.0f;
#pragma omp simd
        for (int64_t k = 0; k < gs; k++) o[k] = rintf(v[k] / safe) * scale + 0.0f; /* -0 as +0, as int8 has it */
    }
}

/* Fused forms (the calls a decode step makes, see engine.py): a product may read rmsnorm(x) * norm_w or
 * silu(x) * gate instead of x, and add its result into `out` instead of storing it (the residual). */
typedef struct {
    const float *norm_w; /* non-NULL: the input is rmsnorm(x) * norm_w, with eps */
    float eps;
    const float *gate;   /* non-NULL: the input is silu(x) * gate */
    int accumulate;      /* out += x @ w.T instead of out = x @ w.T */
} Fusion;

void rmsnorm(const float *x, const float *weight, int64_t n_tok, int64_t dim, float eps, float *out);
static void swiglu_rows(const float *a, const float *b, int64_t n_tok, int64_t n, float *out);

/* Scratch for what a product prepares once per call and every thread then reads (its fused input, the
 * activations quantized and laid out): taken in turn from a ring per calling thread instead of malloc, which
 * hands the same lines back call after call, lines the other threads have just read, so that each write
 * would first take them back from those threads' caches, which lengthens a decode step's serial set-up
 * (docs/speed.md). A request over SCRATCH_MAX comes from malloc; a
 * product takes at most 26 buffers, so a live buffer is never handed out again before it is released. */
#define SCRATCH_BYTES (2 << 20)
#define SCRATCH_MAX (SCRATCH_BYTES / 32)

static pthread_key_t scratch_key;
static __thread char *scratch;
static __thread int64_t scratch_at;

static void make_scratch_key(void) { pthread_key_create(&scratch_key, free); }

static void *scratch_alloc(int64_t bytes, int zero) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    bytes = (bytes + 63) / 64 * 64;
    if (scratch == NULL && bytes <= SCRATCH_MAX) {
        pthread_once(&once, make_scratch_key);
        scratch = aligned_alloc(64, SCRATCH_BYTES);
        if (scratch != NULL) pthread_setspecific(scratch_key, scratch); /* freed when the thread ends */
    }
    if (scratch == NULL || bytes > SCRATCH_MAX) return zero ? calloc(1, bytes) : malloc(bytes);
    if (scratch_at + bytes > SCRATCH_BYTES) scratch_at = 0;
    void *p = scratch + scratch_at;
    scratch_at += bytes;
    if (zero) memset(p, 0, bytes);
    return p;
}

static void scratch_free(void *p) {
    if (scratch == NULL || (char *)p < scratch || (char *)p >= scratch + SCRATCH_BYTES) free(p);
}

/* rows [t0, t1) of a fused input (x's rows through f's RMSNorm or SwiGLU) into `fused` */
static void fused_rows(const float *x, const Fusion *f, int64_t t0, int64_t t1, int64_t n, float *fused) {
    if (f->norm_w) rmsnorm(x + t0 * n, f->norm_w, t1 - t0, n, f->eps, fused + t0 * n);
    else swiglu_rows(x + t0 * n, f->gate + t0 * n, t1 - t0, n, fused + t0 * n);
}

static inline void store(float *o, float value, int accumulate) { *o = accumulate ? *o + value : value; }

/* The int8 products (AVX2 and AVX-512 rows) prefetch their weights some bytes ahead in a thread's stream of rows,
 * distances chosen when the library loads, by what was measured on each kind of CPU (docs/speed.md), one for
 * weights that stream from memory (prefetch_bytes) and one for weights that stay in the last-level cache from one
 * token to the next (prefetch_cached: a small model's):
 * - Intel's (a Sapphire Rapids-class Xeon): 2 KiB ahead, both: the 110M and 1B shapes' regrouped rows read faster
 *   with it (Q8_0R 4-9%, Q4_0R 15-25%), AVX2 and AVX-512 rows alike, 4 KiB and more slower; small models' rows
 *   with and without it not compared there.
 * - AMD's Zen 4 (AVX-512): none: the prefetchers keep up, and any software prefetch slowed the stream.
 * - AMD's later CPUs with AVX-512 (Zen 5): 6 KiB ahead from memory (1 to 8 KiB alike within a VM's noise; a 110M
 *   model's decode 1.24-1.31x as fast as without on Q8_0, 1.39-1.46x on Q4_0), none from the cache (there the rows
 *   are bound by their arithmetic, and the prefetch instructions alone, 256 bytes ahead as 6 KiB, made a 15M
 *   model's decode 3-11% slower).
 * - AMD's without AVX-512 (Zen 3): 6 KiB ahead: the prefetchers alone leave the AVX2 rows well below the bandwidth.
 * A decode step (forward_step) takes the cache's distance where its model's matrices fit in the last-level cache
 * (llc_bytes, known on AMD's CPUs: the cache a core complex shares), a product called alone (matmul) the memory's.
 * fp32 rows are 4x longer in bytes and the same prefetch makes single-token products slower, so only batched fp32
 * products prefetch (further ahead: with several tokens' arithmetic per weight the prefetchers alone fall behind).
 * -DPREFETCH_BYTES=N fixes both distances at compile time (for measurements). */
static int64_t llc_bytes = 0; /* 0: not known (every model streams from memory) */
#ifdef PREFETCH_BYTES
static const int64_t prefetch_bytes = PREFETCH_BYTES, prefetch_cached = PREFETCH_BYTES;
#else
static int64_t prefetch_bytes = 6144, prefetch_cached = 6144;
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

/* AMD's last-level cache in bytes from CPUID leaf 0x8000001D (its caches, level by level: the L3 a core complex
 * shares), 0 where the leaf is missing. glibc's sysconf may name a whole socket's instead (384 MiB on a Zen 5 VM
 * whose core complex has 32). */
static int64_t amd_l3_bytes(void) {
    unsigned a, b, c, d;
    if ((unsigned)__get_cpuid_max(0x80000000, NULL) < 0x8000001Du) return 0; /* clang returns int, gcc unsigned */
    for (unsigned sub = 0; sub < 8; sub++) {
        __cpuid_count(0x8000001D, sub, a, b, c, d);
        if ((a & 31) == 0) break; /* no more caches */
        if ((a >> 5 & 7) == 3)
            return (int64_t)((b >> 22) + 1) * ((b >> 12 & 1023) + 1) * ((b & 4095) + 1) * ((int64_t)c + 1);
    }
    return 0;
}
#endif

__attribute__((constructor)) static void choose_prefetch_distances(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init(); /* before main: cpu_is and cpu_supports need the CPU's description read first */
    if (__builtin_cpu_is("amd")) llc_bytes = amd_l3_bytes();
#ifndef PREFETCH_BYTES
    if (__builtin_cpu_is("intel")) {
        prefetch_bytes = prefetch_cached = 2048;
    } else if (__builtin_cpu_is("amd") && __builtin_cpu_supports("avx512f")) {
        prefetch_cached = 0;
        if (__builtin_cpu_is("amdfam19h")) prefetch_bytes = 0; /* Zen 4 (Zen 3, the same family, has no AVX-512) */
    }
#endif
#endif
}

/* test and benchmark hook (tests/test_kernels.py, benchmarks/decode_rates.c; not bound by the package): the
 * distance for weights in the cache (`cached` 1) or streaming from memory (0), first set to `set` where that is 0
 * or more (not in builds that fix it at compile time), so that one process can compare distances */
int64_t kernel_prefetch_bytes(int cached, int64_t set) {
#ifndef PREFETCH_BYTES
    if (set >= 0) *(cached ? &prefetch_cached : &prefetch_bytes) = set;
#else
    (void)set;
#endif
    return cached ? prefetch_cached : prefetch_bytes;
}
int64_t kernel_llc_bytes(void) { return llc_bytes; } /* read by tests */

/* Whether single-token Q8_0R and Q8R products on the 256-bit int8 rows (AVX2 builds, and AVX-512 ones without
 * HAVE_ZMM_INT8's VNNI and VBMI, which run them) read their rows in pairs, two streams a thread (rows_q8r_pairs),
 * set where the library loads by what was measured. On an Intel CPU (a Sapphire Rapids-class Xeon running these
 * builds, where one stream of 256-bit loads reads DRAM ~10% slower than two, while 512-bit loads read as fast in
 * one as in two) pairs, each stream prefetched 1 KiB ahead, decode a 1B-shaped Q8_0 model 1.15-1.17x as fast as
 * one stream 2 KiB ahead with AVX-VNNI, 1.05-1.07x without, 1.04x on AVX-512 without VNNI, and 110M (partly read
 * from the cache) 1.04-1.15x. AMD's CPUs keep one stream: a Zen 5 VM's AVX2 builds read 110M's rows 1.12-1.24x
 * slower in pairs (Zen 3 not measured). -DQ8_PAIRS=0/1 sets the starting choice at compile time,
 * -DQ8_PAIR_PREFETCH_BYTES=N the pairs' distance (for measurements). */
#ifndef Q8_PAIR_PREFETCH_BYTES
#define Q8_PAIR_PREFETCH_BYTES 1024
#endif
#if defined(__AVX2__) && !defined(HAVE_ZMM_INT8)
#define HAVE_Q8_PAIRS 1
static const int64_t q8_pair_prefetch_bytes = Q8_PAIR_PREFETCH_BYTES;
#ifdef Q8_PAIRS
static int q8_pairs = Q8_PAIRS;
#else
static int q8_pairs = 0;

__attribute__((constructor)) static void choose_q8_pairs(void) {
    __builtin_cpu_init();
    q8_pairs = __builtin_cpu_is("intel");
}
#endif
#endif

/* test hook: whether single-token Q8_0R/Q8R rows go in pairs (0 where the build has no pairs: 512-bit rows read
 * as fast in one stream, builds without AVX2 have no such rows); `on` 0 or 1 sets it first on builds that have them */
int kernel_q8_pairs(int on) {
#ifdef HAVE_Q8_PAIRS
    if (on == 0 || on == 1) q8_pairs = on;
    return q8_pairs;
#else
    (void)on;
    return 0;
#endif
}

#define F32_BATCH_PREFETCH_BYTES 8192

/* ------------------------------------------------------------------------------------------- fp32 */

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 8 lane sums of v[0..7] at once: lane r = hsum8(v[r]), in hsum8's order (lane j + (j + 4), then + 2, then
 * + 1), two or four vectors side by side per instruction */
static inline __m256 f32_sums8(const __m256 *v) {
    __m256 h[4];
    for (int l = 0; l < 4; l++) /* j + (j + 4): v[l]'s four sums in the low half, v[l + 4]'s in the high one */
        h[l] = _mm256_add_ps(_mm256_permute2f128_ps(v[l], v[l + 4], 0x20), _mm256_permute2f128_ps(v[l], v[l + 4], 0x31));
    __m256 q0 = _mm256_add_ps(_mm256_shuffle_ps(h[0], h[1], 0x44), _mm256_shuffle_ps(h[0], h[1], 0xEE)); /* + 2 */
    __m256 q1 = _mm256_add_ps(_mm256_shuffle_ps(h[2], h[3], 0x44), _mm256_shuffle_ps(h[2], h[3], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(q0, q1, 0x88), _mm256_shuffle_ps(q0, q1, 0xDD)); /* + 1 */
}

/* `store` for eight consecutive outputs */
static inline void store8(float *o, __m256 values, int accumulate) {
    _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), values) : values);
}
#endif

/* Dense weights (the fp32 kernels below): `wt` says what w points at, fp32 values (W_F32), IEEE halves (W_F16)
 * or bfloat16 ones (W_BF16, the top 16 bits of an fp32), each converted to fp32 (exactly) as it is loaded; `wt`
 * is a constant wherever these are inlined. */
ALWAYS_INLINE const void *w_at(const void *w, int64_t i, int wt) {
    return (const char *)w + i * (wt == W_F32 ? 4 : 2);
}
static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
ALWAYS_INLINE float w_get(const void *w, int64_t i, int wt) {
    if (wt == W_F32) return ((const float *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    return wt == W_F16 ? fp16_to_f32(h) : bf16_to_f32(h);
}
#ifdef __AVX2__
ALWAYS_INLINE __m256 w_load8(const void *w, int64_t i, int wt) {
    if (wt == W_F32) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)w_at(w, i, wt));
    if (wt == W_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#ifdef __F16C__
    return _mm256_cvtph_ps(h);
#else
    float v[8];
    for (int j = 0; j < 8; j++) v[j] = w_get(w, i + j, wt);
    return _mm256_loadu_ps(v);
#endif
}
#endif
#if defined(HAVE_AVX512)
ALWAYS_INLINE __m512 widen16(__m256i h, int wt) {
    return wt == W_F16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
ALWAYS_INLINE __m512 w_load16(const void *w, int64_t i, int wt) {
    if (wt == W_F32) return _mm512_loadu_ps((const float *)w + i);
    return widen16(_mm256_loadu_si256((const __m256i *)w_at(w, i, wt)), wt);
}
ALWAYS_INLINE __m512 w_load16_masked(__mmask16 mask, const void *w, int64_t i, int wt) {
    if (wt == W_F32) return _mm512_maskz_loadu_ps(mask, (const float *)w + i);
    return widen16(_mm256_maskz_loadu_epi16(mask, w_at(w, i, wt)), wt);
}
#endif

/* scalar sum of w[k] x[k] for k in [from, n): the tail of a row whose length is not a multiple of 8. Each
 * product is rounded before it is added (stored through a volatile, which the compiler cannot fuse into the
 * add: it would otherwise fuse some multiply-adds and not others depending on how the weight was loaded, and
 * fp32 and fp16 rows must agree). At most 7 products a row. */
ALWAYS_INLINE float tail_dot(const void *w, const float *x, int64_t from, int64_t n, int wt) {
    float acc = 0.0f;
    for (int64_t k = from; k < n; k++) {
        volatile float product = w_get(w, k, wt) * x[k];
        acc += product;
    }
    return acc;
}

#if defined(HAVE_AVX512)
/* Tokens whose dots one pass over a weight row computes (each weight vector loaded once for all of them). */
#define F32_TOKENS_PER_PASS 8

/* The sum of v's 16 lanes as a tree: lane j + (j + 8), then + 4, + 2, + 1 (GCC's _mm512_reduce_add_ps; written
 * out so that every compiler sums in this order, which f32_sums16 below repeats for 16 vectors at once) */
ALWAYS_INLINE float hsum16(__m512 v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_shuffle_ps(q, q, 0x4E));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

/* res[t] = dot(w, x[t]) for t < nt: per token two accumulators, a0 over the 16-float blocks at k = 0, 32, 64,
 * ... and a1 over those at 16, 48, ..., then one more 16-float block into a0 and the last n % 16 under a mask
 * into a1; res = hsum16(a0 + a1). Every batched fp32 path computes each token's dot in exactly this order. */
ALWAYS_INLINE void dots_f32_simd(const void *w, const float *x, int64_t n, int nt, float *res, int wt) {
    __m512 a0[8], a1[8];
    UNROLL
    for (int t = 0; t < nt; t++) a0[t] = a1[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        __m512 w0 = w_load16(w, k, wt), w1 = w_load16(w, k + 16, wt);
        if (nt > 1) _mm_prefetch((const char *)w_at(w, k, wt) + F32_BATCH_PREFETCH_BYTES, _MM_HINT_T0);
        UNROLL
        for (int t = 0; t < nt; t++) {
            a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * n + k), a0[t]);
            a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * n + k + 16), a1[t]);
        }
    }
    if (k + 16 <= n) {
        __m512 w0 = w_load16(w, k, wt);
        UNROLL
        for (int t = 0; t < nt; t++) a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * n + k), a0[t]);
        k += 16;
    }
    if (k < n) {
        __mmask16 mask = (__mmask16)((1u << (n - k)) - 1);
        __m512 w0 = w_load16_masked(mask, w, k, wt);
        UNROLL
        for (int t = 0; t < nt; t++) a1[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, x + t * n + k), a1[t]);
    }
    UNROLL
    for (int t = 0; t < nt; t++) res[t] = hsum16(_mm512_add_ps(a0[t], a1[t]));
}

/* Several weight rows at once (a decode step of several tokens is arithmetic-bound here, not memory-bound).
 * One row against 8 tokens needs a load of x per FMA, and the load port, not the FMA units, set the pace;
 * R rows x T tokens take R + T loads per R * T FMAs. The two accumulators of dots_f32_simd per (row, token)
 * would be 2 R T registers, so the blocks run each chain on its own: a pass over the a0 blocks, then one over
 * the a1 blocks, each with R T accumulators in registers; every sum is the same as dots_f32_simd's. */

/* loops over up to 16 accumulators, unrolled whole so that they stay in registers */
#define UNROLL16 _Pragma("GCC unroll 16")

/* The 16 lane sums of v[0..15] at once: lane s = hsum16(v[s]), in hsum16's order (each step pairs the same
 * lanes, two vectors side by side per instruction) */
ALWAYS_INLINE __m512 f32_sums16(const __m512 *v) {
    /* the steps below leave the sum of input slot q + 4 e in lane 4 q + e: slot q + 4 e takes v[4 q + e] */
    static const int slot[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
    __m512 h[8], q[4], p[2];
    UNROLL16
    for (int i = 0; i < 8; i++) /* j + (j + 8): a's eight sums in the low half, b's in the high one */
        h[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[slot[2 * i]], v[slot[2 * i + 1]], 0x44),
                             _mm512_shuffle_f32x4(v[slot[2 * i]], v[slot[2 * i + 1]], 0xEE));
    UNROLL16
    for (int i = 0; i < 4; i++) /* + 4: one vector's four sums per 128-bit lane */
        q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0xDD));
    UNROLL16
    for (int i = 0; i < 2; i++) /* + 2 */
        p[i] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * i], q[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(q[2 * i], q[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(p[0], p[1], 0x88), _mm512_shuffle_ps(p[0], p[1], 0xDD)); /* + 1 */
}

/* acc[r T + t] += w[r][k : k + 16] . x[t][k : k + 16] for k = from, from + 32, ... while k + 16 <= to: one
 * chain's blocks. x is loaded into a register once for the R rows (an asm barrier keeps the compiler from
 * folding a load into each FMA). `prefetch`: also ask for the same lines of a later block of rows, ahead by
 * whole blocks, into L2 (the pass over the a1 blocks reads lines the a0 pass brought in). */
ALWAYS_INLINE void f32_chain(const void *w, const float *x, int64_t n, int R, int T, int64_t from, int64_t to,
                             __m512 *acc, int64_t prefetch, int wt) {
    __m512 a[16];
    UNROLL16
    for (int j = 0; j < R * T; j++) a[j] = acc[j];
    for (int64_t k = from; k + 16 <= to; k += 32) {
        __m512 wv[4];
        UNROLL16
        for (int r = 0; r < R; r++) {
            wv[r] = w_load16(w, r * n + k, wt);
            if (prefetch) {
                _mm_prefetch((const char *)w_at(w, r * n + k + prefetch, wt), _MM_HINT_T1);
                _mm_prefetch((const char *)w_at(w, r * n + k + 16 + prefetch, wt), _MM_HINT_T1);
            }
        }
        UNROLL16
        for (int t = 0; t < T; t++) {
            __m512 xv = _mm512_loadu_ps(x + t * n + k);
            __asm__("" : "+v"(xv));
            UNROLL16
            for (int r = 0; r < R; r++) a[r * T + t] = _mm512_fmadd_ps(wv[r], xv, a[r * T + t]);
        }
    }
    UNROLL16
    for (int j = 0; j < R * T; j++) acc[j] = a[j];
}

/* out[t * stride + r] (=, or += with accumulate) dot(w[r], x[t]) for R rows and T tokens, R T <= 16 */
ALWAYS_INLINE void f32_block(const void *w, const float *x, int64_t n, int R, int T, float *out, int64_t stride,
                             int accumulate, int wt) {
    __m512 a0[16], a1[16], sums[16];
    UNROLL16
    for (int j = 0; j < R * T; j++) a0[j] = a1[j] = _mm512_setzero_ps();
    int64_t n32 = n / 32 * 32, block = R * n;
    int64_t prefetch = (F32_BATCH_PREFETCH_BYTES / 4 + block - 1) / block * block;
    f32_chain(w, x, n, R, T, 0, n32, a0, prefetch, wt);
    f32_chain(w, x, n, R, T, 16, n32, a1, 0, wt);
    int64_t k = n32;
    if (k + 16 <= n) {
        f32_chain(w, x, n, R, T, k, k + 16, a0, 0, wt);
        k += 16;
    }
    if (k < n) {
        __mmask16 mask = (__mmask16)((1u << (n - k)) - 1);
        UNROLL16
        for (int r = 0; r < R; r++) {
            __m512 wv = w_load16_masked(mask, w, r * n + k, wt);
            UNROLL16
            for (int t = 0; t < T; t++)
                a1[r * T + t] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + t * n + k), a1[r * T + t]);
        }
    }
    UNROLL16
    for (int t = 0; t < T; t++) /* token-major for the stores */
        UNROLL16
        for (int r = 0; r < R; r++) sums[t * R + r] = _mm512_add_ps(a0[r * T + t], a1[r * T + t]);
    UNROLL16
    for (int j = R * T; j < 16; j++) sums[j] = _mm512_setzero_ps();
    float res[16];
    _mm512_storeu_ps(res, f32_sums16(sums));
    UNROLL16
    for (int t = 0; t < T; t++)
        UNROLL16
        for (int r = 0; r < R; r++) store(&out[t * stride + r], res[t * R + r], accumulate);
}

/* Rows per block: 2 rows x 8 tokens; for long rows (w2's hidden_dim) 4 x 4, whose x (4 tokens) stays nearer in
 * cache than 8 tokens' would, which makes long rows' products markedly faster (docs/speed.md) */
#define F32_LONG_ROW 1024
/* rows a pass of T tokens covers before the next pass (more than T tokens) */
#define F32_SPAN_BYTES (64 * 1024)

ALWAYS_INLINE void f32_blocks_r2(const void *w, const float *x, int64_t n, int T, float *out, int64_t stride, int acc,
                                 int wt) {
    switch (T) { /* constant sizes keep the accumulators in registers */
#define F32_BLOCK(c) case c: f32_block(w, x, n, 2, c, out, stride, acc, wt); return;
        F32_BLOCK(1) F32_BLOCK(2) F32_BLOCK(3) F32_BLOCK(4) F32_BLOCK(5) F32_BLOCK(6) F32_BLOCK(7) F32_BLOCK(8)
#undef F32_BLOCK
    }
}

ALWAYS_INLINE void f32_blocks_r4(const void *w, const float *x, int64_t n, int T, float *out, int64_t stride, int acc,
                                 int wt) {
    switch (T) {
#define F32_BLOCK(c) case c: f32_block(w, x, n, 4, c, out, stride, acc, wt); return;
        F32_BLOCK(1) F32_BLOCK(2) F32_BLOCK(3) F32_BLOCK(4)
#undef F32_BLOCK
    }
}
#elif defined(__AVX2__)
/* three tokens' four accumulators and the four weight vectors fill the 16 AVX2 registers */
#define F32_TOKENS_PER_PASS 3
/* sum8[t] = the 8 partial sums of dot(w, x[t][0 : n - n % 8]) for t < nt <= 3: per token four accumulators
 * over 32 floats a step (four loads in flight rather than one FMA chain), then 8-float steps into the first,
 * then the four added pairwise; the order is the same for any nt */
ALWAYS_INLINE void f32_partials(const void *w, const float *x, int64_t n, int nt, __m256 *sum8, int wt) {
    __m256 a[3][4];
    UNROLL
    for (int t = 0; t < nt; t++) a[t][0] = a[t][1] = a[t][2] = a[t][3] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        __m256 w0 = w_load8(w, k, wt), w1 = w_load8(w, k + 8, wt);
        __m256 w2 = w_load8(w, k + 16, wt), w3 = w_load8(w, k + 24, wt);
        if (nt > 1) _mm_prefetch((const char *)w_at(w, k, wt) + F32_BATCH_PREFETCH_BYTES, _MM_HINT_T0);
        UNROLL
        for (int t = 0; t < nt; t++) {
            const float *xt = x + t * n + k;
            a[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), a[t][0]);
            a[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt + 8), a[t][1]);
            a[t][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xt + 16), a[t][2]);
            a[t][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xt + 24), a[t][3]);
        }
    }
    int64_t k8 = k;
    for (; k8 + 8 <= n; k8 += 8) {
        __m256 w0 = w_load8(w, k8, wt);
        UNROLL
        for (int t = 0; t < nt; t++) a[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + t * n + k8), a[t][0]);
    }
    UNROLL
    for (int t = 0; t < nt; t++) sum8[t] = _mm256_add_ps(_mm256_add_ps(a[t][0], a[t][1]), _mm256_add_ps(a[t][2], a[t][3]));
}

/* res[t] = dot(w, x[t]): the partial sums' horizontal sum, plus the n % 8 last products in scalar */
ALWAYS_INLINE void dots_f32_simd(const void *w, const float *x, int64_t n, int nt, float *res, int wt) {
    __m256 sum8[3];
    f32_partials(w, x, n, nt, sum8, wt);
    UNROLL
    for (int t = 0; t < nt; t++) res[t] = hsum8(sum8[t]) + tail_dot(w, x + t * n, n - n % 8, n, wt);
}
#else
#define F32_TOKENS_PER_PASS 8
#endif

/* res[t] = dot(w, x[t]) for one weight row and nt <= F32_TOKENS_PER_PASS rows of x (rows of n floats) */
ALWAYS_INLINE void dots_f32(const void *w, const float *x, int64_t n, int nt, float *res, int wt) {
#if defined(__AVX2__)
    switch (nt) { /* a constant token count lets the compiler keep every accumulator in a register */
#define DOTS_F32(c) case c: dots_f32_simd(w, x, n, c, res, wt); return;
        DOTS_F32(1) DOTS_F32(2) DOTS_F32(3)
#if F32_TOKENS_PER_PASS == 8
        DOTS_F32(4) DOTS_F32(5) DOTS_F32(6) DOTS_F32(7) DOTS_F32(8)
#endif
#undef DOTS_F32
    }
#endif
    for (int t = 0; t < nt; t++) res[t] = tail_dot(w, x + t * n, 0, n, wt);
}

/* rows [lo, hi) of m for every token. One token: a row at a time (one sequential stream for the prefetchers;
 * memory-bound). Several (AVX-512): blocks of rows x tokens (f32_block), the rows that do not fill a block a
 * row at a time; else a row at a time for F32_TOKENS_PER_PASS tokens a pass. Every way gives each token the
 * same sums. */
ALWAYS_INLINE void rows_dense(const Mat *m, int64_t lo, int64_t hi, const float *x, int64_t n_tok, int64_t n,
                              float *out, int accumulate, int wt) {
    const void *w = m->w;
    float *o = out + n_tok * m->row0;
    int64_t i = lo;
#if defined(HAVE_AVX512)
    if (n_tok > 1) {
        int R = n > F32_LONG_ROW ? 4 : 2, T = n > F32_LONG_ROW ? 4 : 8;
        /* more than T tokens: every pass of T tokens over a span of rows small enough to stay in L2 for the
         * next pass (the rows would come from memory again, and each pass's x stays in L1) */
        int64_t span = F32_SPAN_BYTES / (4 * n) / R * R, blocks_end = lo + (hi - lo) / R * R;
        span = span > R ? span : R;
        for (int64_t s = lo; s < blocks_end; s += span) {
            int64_t e = s + span < blocks_end ? s + span : blocks_end;
            for (int64_t t0 = 0; t0 < n_tok; t0 += T) {
                int nt = n_tok - t0 < T ? (int)(n_tok - t0) : T;
                for (int64_t j = s; j < e; j += R) {
                    float *oj = o + t0 * m->rows + j;
                    if (R == 4) f32_blocks_r4(w_at(w, j * n, wt), x + t0 * n, n, nt, oj, m->rows, accumulate, wt);
                    else f32_blocks_r2(w_at(w, j * n, wt), x + t0 * n, n, nt, oj, m->rows, accumulate, wt);
                }
            }
        }
        i = blocks_end;
    }
#elif defined(__AVX2__)
    /* one token, rows of a multiple of 8: eight rows' horizontal sums side by side (f32_sums8: hsum8's tree; the
     * tail_dot of no products added as in dots_f32_simd), one store for eight: the same results as a row at a time */
    if (n_tok == 1 && n % 8 == 0)
        for (; i + 8 <= hi; i += 8) {
            __m256 v[8];
            for (int r = 0; r < 8; r++) f32_partials(w_at(w, (i + r) * n, wt), x, n, 1, &v[r], wt);
            store8(o + i, _mm256_add_ps(f32_sums8(v), _mm256_setzero_ps()), accumulate);
        }
#endif
    for (; i < hi; i++)
        for (int64_t t0 = 0; t0 < n_tok; t0 += F32_TOKENS_PER_PASS) {
            int nt = n_tok - t0 < F32_TOKENS_PER_PASS ? (int)(n_tok - t0) : F32_TOKENS_PER_PASS;
            float res[8];
            dots_f32(w_at(w, i * n, wt), x + t0 * n, n, nt, res, wt);
            for (int t = 0; t < nt; t++) store(&o[(t0 + t) * m->rows + i], res[t], accumulate);
        }
}

/* noinline: compiled into its caller the loop runs slower */
static __attribute__((noinline)) void rows_f32(const Mat *m, int64_t lo, int64_t hi, const float *x, int64_t n_tok,
                                               int64_t n, float *out, int accumulate) {
    rows_dense(m, lo, hi, x, n_tok, n, out, accumulate, W_F32);
}

static __attribute__((noinline)) void rows_f16(const Mat *m, int64_t lo, int64_t hi, const float *x, int64_t n_tok,
                                               int64_t n, float *out, int accumulate) {
    rows_dense(m, lo, hi, x, n_tok, n, out, accumulate, W_F16);
}

static __attribute__((noinline)) void rows_bf16(const Mat *m, int64_t lo, int64_t hi, const float *x, int64_t n_tok,
                                                int64_t n, float *out, int accumulate) {
    rows_dense(m, lo, hi, x, n_tok, n, out, accumulate, W_BF16);
}

/* ----------------------------------------------------------------------------- quantized (int8) rows */

/* weight k (< 32) of a Q4_0 block's 16 bytes of nibbles */
static inline int q4_value(const uint8_t *qs, int64_t k) {
    return (k < 16 ? qs[k] & 0x0F : qs[k - 16] >> 4) - 8;
}

/* the values and scale of group g of one quantized weight row (the same group size as the activations) */
ALWAYS_INLINE const uint8_t *group_values(const uint8_t *w, const float *ws, int type, int64_t g, int64_t gs,
                                          float *scale) {
    if (type == W_Q8) {
        *scale = ws[g];
        return w + g * gs;
    }
    const uint8_t *block = w + g * BLOCK_BYTES[type];
    *scale = fp16_to_f32(load_u16(block));
    return block + 2;
}

/* the gs values (gs = 32 or 64) and the scale of group g of a Q8R row of n weights (see W_Q8R), gathered back
 * into runq.c's order (plain C builds, which have no Q8R kernels) */
static void q8r_group_values(const uint8_t *row, int64_t n, int64_t gs, int64_t g, uint8_t *values, float *scale) {
    int64_t nb = n / BLOCK, per = gs / BLOCK;
    for (int64_t k = 0; k < per; k++) {
        int64_t b = g * per + k, b0 = 0, G = rg_group(nb);
        for (; G > 1 && b0 + G <= b; G = rg_group(nb - b0)) b0 += G;
        if (G > 1) { /* b lies in the group of G blocks at b0 (groups of 64 never straddle two: G and b0 are even) */
            const uint8_t *at = row + b0 * (BLOCK + 4 / per);
            rg_gather(at, G, b - b0, BLOCK / 4, values + k * BLOCK);
            *scale = load_f32(at + BLOCK * G + 4 * ((b - b0) / per));
        } else {
            const uint8_t *v, *sc;
            rg_single(row, (int)per, b, &v, &sc);
            memcpy(values + k * BLOCK, v, BLOCK);
            *scale = load_f32(sc);
        }
    }
}

/* res[t] = the quantized dot of one weight row (its scales ws for Q8) with activation rows t < nt, plain C */
static void dots_int8_scalar(const uint8_t *w, const float *ws, int type, const QAct *a, int64_t n, int nt,
                             float *res) {
    int64_t gs = a->gs, n_groups = n / gs;
    for (int t = 0; t < nt; t++) {
        const int8_t *x = a->q + t * n;
        float acc = 0.0f;
        for (int64_t g = 0; g < n_groups; g++) {
            float scale;
            uint8_t block[2 * BLOCK + 2];
            const uint8_t *v;
            if (type == W_Q4_0R || type == W_Q8_0R) { /* the block gathered back into its order: the same sum */
                rg_block(w, n, g, type, block);
                scale = fp16_to_f32(load_u16(block));
                v = block + 2;
            } else if (type == W_Q8R) { /* likewise the group's values */
                q8r_group_values(w, n, gs, g, block, &scale);
                v = block;
            } else {
                v = group_values(w, ws, type, g, gs, &scale);
            }
            /* two loops with the operands' signedness plain to see: gcc 12 with -march=cascadelake vectorizes a
             * mixed loop into vpdpbusd, which takes the int8 weights as unsigned (wrong sums) */
            const int8_t *xg = x + g * gs, *sv = (const int8_t *)v;
            int32_t dot = 0;
            if (type == W_Q4_0 || type == W_Q4_0R)
                for (int64_t k = 0; k < gs; k++) dot += q4_value(v, k) * (int32_t)xg[k];
            else
                for (int64_t k = 0; k < gs; k++) dot += (int32_t)sv[k] * (int32_t)xg[k];
            acc += (float)dot * scale * a->d[t * n_groups + g];
        }
        res[t] = acc;
    }
}

#ifdef __AVX2__
/* per 4-byte lane, the sum of u[i] * s[i] (u unsigned bytes, s signed) added to acc */
ALWAYS_INLINE __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(HAVE_VNNI)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(HAVE_AVXVNNI)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* dot_u8s8 of two pairs, for u of 4-bit values: without VNNI the two byte multiply-adds are summed in int16
 * (each pair at most 2 * 15 * 127, the sum 7620) and widened once */
ALWAYS_INLINE __m256i dot2_u4s8(__m256i acc, __m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#if defined(HAVE_VNNI) || defined(HAVE_AVXVNNI)
    return dot_u8s8(dot_u8s8(acc, u0, s0), u1, s1);
#else
    __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
#endif
}

/* acc + the sums of u[j] * s[j] over 8 pairs, per 4-byte lane, for u of 4-bit values (a Q4_0R group's low and
 * high nibbles against their activations): without VNNI the eight byte multiply-adds are summed in int16 (each
 * at most 2 * 15 * 128 = 3840, the eight 30720 < 32767) and widened once: 17 instructions instead of four
 * dot2_u4s8's 20, fewer per byte, so a product streams its weights from DRAM faster (docs/speed.md). The int32
 * sums are the same integers either way. */
ALWAYS_INLINE __m256i dot8_u4s8(__m256i acc, const __m256i *u, const __m256i *s) {
#if defined(HAVE_VNNI) || defined(HAVE_AVXVNNI)
    __m256i s0 = dot2_u4s8(acc, u[0], s[0], u[1], s[1]);
    __m256i s1 = dot2_u4s8(_mm256_setzero_si256(), u[2], s[2], u[3], s[3]);
    s0 = dot2_u4s8(s0, u[4], s[4], u[5], s[5]);
    s1 = dot2_u4s8(s1, u[6], s[6], u[7], s[7]);
    return _mm256_add_epi32(s0, s1);
#else
    __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(u[0], s[0]), _mm256_maddubs_epi16(u[1], s[1]));
    __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(u[2], s[2]), _mm256_maddubs_epi16(u[3], s[3]));
    p0 = _mm256_add_epi16(p0, _mm256_add_epi16(_mm256_maddubs_epi16(u[4], s[4]), _mm256_maddubs_epi16(u[5], s[5])));
    p1 = _mm256_add_epi16(p1, _mm256_add_epi16(_mm256_maddubs_epi16(u[6], s[6]), _mm256_maddubs_epi16(u[7], s[7])));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(p0, p1), _mm256_set1_epi16(1)));
#endif
}

/* 32 weights at v as signed bytes: int8 values, or a Q4_0 block's nibbles minus 8 */
ALWAYS_INLINE __m256i load_weights32(const uint8_t *v, int type) {
    if (type == W_Q4_0) {
        __m128i q = _mm_loadu_si128((const __m128i *)v);
        __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
        return _mm256_sub_epi8(nib, _mm256_set1_epi8(8));
    }
    return _mm256_loadu_si256((const __m256i *)v);
}

/* acc[t] = the quantized dot of one weight row with activation row t < nt <= 8 (group size a multiple of 32),
 * on the plain activations, as 8 partial sums (the dot is hsum8 of them): per group, exact int32 sums 32
 * products at a time as |w| x (x * sign(w)), then acc += sum * w_scale * x_scale in 8 lanes; each weight vector
 * is loaded (and |w| taken) once for all the tokens. GS: the group size where the caller knows it at compile
 * time (0: a->gs), so that a group's steps are unrolled into one block of loads and multiply-adds: with the
 * group size read at run time, the steps are not unrolled and the products read DRAM markedly slower, for
 * runq.c's layout and llama.cpp's blocks alike (docs/speed.md; the same sums in the same order either way). */
ALWAYS_INLINE void dots_int8_avx2(const uint8_t *w, const float *ws, int type, const QAct *a, int64_t n, int nt,
                                  __m256 *acc, int GS) {
    int64_t gs = GS ? GS : a->gs, n_groups = n / gs;
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_groups; g++) {
        float scale;
        const uint8_t *v = group_values(w, ws, type, g, gs, &scale);
        __m256i isum[8];
        UNROLL
        for (int t = 0; t < nt; t++) isum[t] = _mm256_setzero_si256();
        UNROLL
        for (int64_t k = 0; k < gs; k += 32) {
            __m256i wv = load_weights32(type == W_Q4_0 ? v + k / 2 : v + k, type);
            __m256i wabs = _mm256_abs_epi8(wv); /* -128 -> 0x80, which is 128 read as unsigned */
            UNROLL
            for (int t = 0; t < nt; t++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(a->q + t * n + g * gs + k));
                isum[t] = dot_u8s8(isum[t], wabs, _mm256_sign_epi8(xv, wv));
            }
        }
        UNROLL
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(scale * a->d[t * n_groups + g]),
                                     acc[t]);
    }
}
#endif

#if defined(__AVX2__) && !defined(HAVE_ZMM_INT8)
/* Q4_0, two blocks a step on the Q4_0 activation layout (see QAct): the blocks' 16 bytes of nibbles
 * interleaved 4 bytes at a time, low nibbles (weights 0-15) and high ones (16-31) used unsigned; each block's
 * int32 sum starts at its correction (-8 * sum of x) and is scaled by d_w * d_x in its lanes (l % 2) */
ALWAYS_INLINE void dots_q4_simd(const uint8_t *w, int64_t nb, const QAct *a, int nt, __m256 *acc) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t step = 0; step < (nb + 1) / 2; step++) {
        const uint8_t *b0 = w + 2 * step * 18;
        int second = 2 * step + 1 < nb;
        __m128i q0 = _mm_loadu_si128((const __m128i *)(b0 + 2));
        __m128i q1 = second ? _mm_loadu_si128((const __m128i *)(b0 + 20)) : _mm_setzero_si128();
        __m256i v = _mm256_set_m128i(_mm_unpackhi_epi32(q0, q1), _mm_unpacklo_epi32(q0, q1));
        __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        float d1 = second ? fp16_to_f32(load_u16(b0 + 18)) : 0.0f;
        __m128 pair = _mm_unpacklo_ps(_mm_set_ss(fp16_to_f32(load_u16(b0))), _mm_set_ss(d1));
        __m256 wd = _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(pair)));
        UNROLL
        for (int t = 0; t < nt; t++) {
            const int8_t *x = a->q4 + t * a->q4_stride + step * 64;
            __m256i s = _mm256_zextsi128_si256(_mm_loadl_epi64((const __m128i *)(a->c4 + t * a->c4_stride + step * 2)));
            s = dot2_u4s8(s, lo, _mm256_loadu_si256((const __m256i *)x), hi,
                          _mm256_loadu_si256((const __m256i *)(x + 32)));
            __m256 xd = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(a->d4 + t * a->d4_stride + step * 2)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(wd, xd), acc[t]);
        }
    }
}
#endif

#ifdef __AVX2__
ALWAYS_INLINE int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Q4_0R (see W_Q4_0R) on the activations regrouped the same way (QAct.q16), 8 lanes at a time: lanes
 * 8h..8h+7 of a group of G blocks (G = 16: h = 0 or 1; G = 8 or 4: h = 0, lanes past G zero). Per token, the
 * four vectors' low nibbles meet values 4v.. and their high ones the values 16 bytes further on, each block's
 * int32 sum in its own lane, started at its correction; then one conversion and one multiply-add by d_w * d_x
 * for the 8 blocks, into acc8. No byte shuffles: the weights were regrouped once, when the model was loaded. */
ALWAYS_INLINE __m256i q4r_load8(const void *p, int G) {
    return G >= 8 ? _mm256_loadu_si256((const __m256i *)p) : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p));
}

ALWAYS_INLINE void q4r_lanes8(const uint8_t *w, int64_t b0, int G, int h, const QAct *a, int64_t n, int nt,
                              __m256 *acc8) {
    const uint8_t *g = w + b0 * 18;
    int64_t nb = n / BLOCK, first = b0 + 8 * h;
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i nibbles[8]; /* the low nibbles of the four vectors, then their high ones */
    UNROLL
    for (int j = 0; j < 4; j++) {
        __m256i v = q4r_load8(g + 4 * G * j + 32 * h, G);
        nibbles[j] = _mm256_and_si256(v, low);
        nibbles[4 + j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    __m128i h16 = G == 4 ? _mm_loadl_epi64((const __m128i *)(g + 16 * G)) : _mm_loadu_si128((const __m128i *)(g + 16 * G + 16 * h));
    __m256 wd = _mm256_cvtph_ps(h16);
    UNROLL
    for (int t = 0; t < nt; t++) {
        const int8_t *x = a->q16 + t * n + b0 * BLOCK + 32 * h;
        __m256i xs[8];
        UNROLL
        for (int j = 0; j < 8; j++) xs[j] = q4r_load8(x + 4 * G * j, G);
        __m256i sum = dot8_u4s8(q4r_load8(a->c16 + t * nb + first, G), nibbles, xs);
        __m256 xd = _mm256_castsi256_ps(q4r_load8(a->d + t * nb + first, G));
        acc8[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(wd, xd), acc8[t]);
    }
}

/* The kernels below run Q8_0R and Q8R (see W_Q8R) rows alike; `per` tells them apart: 0 for Q8_0R, else Q8R's
 * blocks per group scale (1 or 2). A group's values are followed by its scales, an fp16 one per block (Q8_0R)
 * or an fp32 one per group (Q8R). A kernel reads the weight scales of its lanes' blocks once, then per token
 * the products d_w * d_x, one a lane; with groups of 64 those are multiplied a group each and then spread over
 * the group's two lanes. */
ALWAYS_INLINE int64_t rg_scale_bytes(int per) { return per == 1 ? 4 : 2; } /* per block */
ALWAYS_INLINE int64_t rg_block_bytes(int per) { return BLOCK + rg_scale_bytes(per); }

/* the activation scales of token t, one per group of the weights' (Q8_0R: per block) */
ALWAYS_INLINE const float *rg_xd(const QAct *a, int64_t n, int per, int t) {
    return a->d + t * (n / BLOCK / (per == 2 ? 2 : 1));
}

/* the weight scales at p of 4 or 8 blocks (groups of 64: of their 2 or 4 groups, in the low lanes) */
ALWAYS_INLINE __m128 rg_scales4(const uint8_t *p, int per) {
    if (!per) return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p));
    if (per == 1) return _mm_loadu_ps((const float *)p);
    return _mm_castpd_ps(_mm_load_sd((const double *)p));
}

ALWAYS_INLINE __m256 rg_scales8(const uint8_t *p, int per) {
    if (!per) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    if (per == 1) return _mm256_loadu_ps((const float *)p);
    return _mm256_castps128_ps256(_mm_loadu_ps((const float *)p));
}

/* d_w * d_x of blocks b.., one a lane, from their weight scales wd and the token's activation scales xd */
ALWAYS_INLINE __m128 rg_dd4(__m128 wd, const float *xd, int per, int64_t b) {
    if (per < 2) return _mm_mul_ps(wd, _mm_loadu_ps(xd + b));
    __m128 two = _mm_mul_ps(wd, _mm_castpd_ps(_mm_load_sd((const double *)(xd + b / 2))));
    return _mm_unpacklo_ps(two, two);
}

ALWAYS_INLINE __m256 rg_dd8(__m256 wd, const float *xd, int per, int64_t b) {
    if (per < 2) return _mm256_mul_ps(wd, _mm256_loadu_ps(xd + b));
    __m128 four = _mm_mul_ps(_mm256_castps256_ps128(wd), _mm_loadu_ps(xd + b / 2));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(four), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
}

/* A Q8_0R vector of weights v against the token's values x in dot_u8s8, whose first operand is unsigned. With
 * VNNI's multiply-adds (no saturation) the weights go as w + 128 and each block's int32 sum starts from its
 * correction -128 * (sum of its values), as the AVX-512 rows do; without VNNI, maddubs's byte pairs could
 * saturate (2 * 255 * 127), so |w| meets x * sign(w), one operation more per 32 bytes. Each block's int32 sum is
 * the same either way. */
#if defined(HAVE_VNNI) || defined(HAVE_AVXVNNI)
ALWAYS_INLINE __m256i q8r_weights(__m256i v) { return _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80)); }

ALWAYS_INLINE __m256i q8r_values(__m256i x, __m256i v) {
    (void)v;
    return x;
}

/* the int32 sums of token t's blocks b..b+7 start from */
ALWAYS_INLINE __m256i q8r_start(const QAct *a, int64_t n, int t, int64_t b) {
    return _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(a->c16 + t * (n / BLOCK) + b)), 4);
}
#else
ALWAYS_INLINE __m256i q8r_weights(__m256i v) { return _mm256_abs_epi8(v); }

ALWAYS_INLINE __m256i q8r_values(__m256i x, __m256i v) { return _mm256_sign_epi8(x, v); }

ALWAYS_INLINE __m256i q8r_start(const QAct *a, int64_t n, int t, int64_t b) {
    (void)a, (void)n, (void)t, (void)b;
    return _mm256_setzero_si256();
}
#endif

/* Q8_0R (see W_Q8_0R) on the activations regrouped the same way (QAct.q16), 8 lanes at a time (lanes
 * 8h..8h+7 of a group of G = 16 or 8 blocks, as q4r_lanes8): vector j's values meet values 4j..4j+3 of each
 * block (q8r_weights, q8r_values: at most 2 * 128 * 127 a byte pair without VNNI, so maddubs cannot
 * saturate), each block's exact int32 sum in its own lane; then one conversion and one multiply-add by
 * d_w * d_x for the 8 blocks, into acc8. The weight vectors go one at a time, each to every token, so that a
 * build with 16 vector registers holds them. */
ALWAYS_INLINE void q8r_lanes8(const uint8_t *w, int per, int64_t b0, int G, int h, const QAct *a,
                              int64_t n, int nt, __m256 *acc8) {
    const uint8_t *g = w + b0 * rg_block_bytes(per);
    int64_t first = b0 + 8 * h;
    __m256i isum[8];
    UNROLL
    for (int t = 0; t < nt; t++) isum[t] = q8r_start(a, n, t, first);
    UNROLL
    for (int j = 0; j < 8; j++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(g + 4 * G * j + 32 * h)), u = q8r_weights(v);
        UNROLL
        for (int t = 0; t < nt; t++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(a->q16 + t * n + b0 * BLOCK + 4 * G * j + 32 * h));
            isum[t] = dot_u8s8(isum[t], u, q8r_values(x, v));
        }
    }
    __m256 wd = rg_scales8(g + 32 * G + 8 * rg_scale_bytes(per) * h, per);
    UNROLL
    for (int t = 0; t < nt; t++)
        acc8[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), rg_dd8(wd, rg_xd(a, n, per, t), per, first), acc8[t]);
}

/* a group of 4 Q8_0R blocks, whose words fill half a vector: 4 whole vectors, vector k's lanes 0-3 meeting
 * values 8k..8k+3 of blocks 0-3 and lanes 4-7 values 8k+4..8k+7 (as q8r_lanes8 otherwise); the halves' int32
 * sums added, then one conversion and one multiply-add into lanes 0-3 of acc8 */
ALWAYS_INLINE void q8r_group4(const uint8_t *w, int per, int64_t b0, const QAct *a, int64_t n,
                              int nt, __m256 *acc8) {
    const uint8_t *g = w + b0 * rg_block_bytes(per);
    __m256i isum[8];
    UNROLL
    for (int t = 0; t < nt; t++) isum[t] = _mm256_setzero_si256();
    UNROLL
    for (int k = 0; k < 4; k++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(g + 32 * k)), u = _mm256_abs_epi8(v);
        UNROLL
        for (int t = 0; t < nt; t++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(a->q16 + t * n + b0 * BLOCK + 32 * k));
            isum[t] = dot_u8s8(isum[t], u, _mm256_sign_epi8(x, v));
        }
    }
    __m128 wd = rg_scales4(g + 128, per);
    UNROLL
    for (int t = 0; t < nt; t++) {
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(isum[t]), _mm256_extracti128_si256(isum[t], 1));
        __m128 p = _mm_fmadd_ps(_mm_cvtepi32_ps(s4), rg_dd4(wd, rg_xd(a, n, per, t), per, b0),
                                _mm256_castps256_ps128(acc8[t]));
        acc8[t] = _mm256_blend_ps(acc8[t], _mm256_castps128_ps256(p), 0x0F);
    }
}

/* a Q8_0 block (or Q8R's 32 values) left as it is (G = 1): its 32 products on the plain activations, into acc8 */
ALWAYS_INLINE void q8r_single(const uint8_t *w, int per, int64_t g, const QAct *a, int64_t n,
                              int nt, __m256 *acc8) {
    const uint8_t *values, *scale;
    rg_single(w, per, g, &values, &scale);
    __m256i v = _mm256_loadu_si256((const __m256i *)values), u = _mm256_abs_epi8(v);
    float wd = per ? load_f32(scale) : fp16_to_f32(load_u16(scale));
    UNROLL
    for (int t = 0; t < nt; t++) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + t * n + g * BLOCK));
        __m256i s = dot_u8s8(_mm256_setzero_si256(), u, _mm256_sign_epi8(x, v));
        float xd = rg_xd(a, n, per, t)[per == 2 ? g / 2 : g];
        acc8[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(wd * xd), acc8[t]);
    }
}

#ifndef HAVE_ZMM_INT8
/* The last 0-3 blocks of 8 Q4_0R rows (rows r at w + r * rb) for nt tokens: lane r of lasts[t] gets row r's sum
 * of (block sum) * (d_w * d_x) over them, as q4r_lasts16 (the AVX-512 builds') computes it for 16 rows: two rows'
 * 16 bytes of nibbles a vector, transposed 4 bytes at a time within its halves so that each row's block is one
 * lane's; dot8_u4s8's arithmetic on them (its int32 sums are the block's exact sum in every build). The scales
 * are loaded one by one: many AVX2 CPUs run Downfall's microcode fix, which makes gathers slow (not measured
 * here). */
ALWAYS_INLINE void q4r_lasts8(const uint8_t *w, int64_t rb, int count, const QAct *a, int64_t n, int nt,
                              __m256 *lasts) {
    int64_t nb = n / BLOCK;
    const uint8_t *row[8];
    for (int r = 0; r < 8; r++) row[r] = w + (r < count ? r : count - 1) * rb;
    const __m256i low = _mm256_set1_epi8(0x0F);
    UNROLL
    for (int t = 0; t < nt; t++) lasts[t] = _mm256_setzero_ps();
    for (int64_t b = nb - nb % 4; b < nb; b++) {
        __m256i q[4]; /* q[k]'s 128-bit half L: row 4L + k's nibbles */
        for (int k = 0; k < 4; k++)
            q[k] = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(row[4 + k] + 18 * b + 2)),
                                    _mm_loadu_si128((const __m128i *)(row[k] + 18 * b + 2)));
        __m256i t0 = _mm256_unpacklo_epi32(q[0], q[1]), t1 = _mm256_unpackhi_epi32(q[0], q[1]);
        __m256i t2 = _mm256_unpacklo_epi32(q[2], q[3]), t3 = _mm256_unpackhi_epi32(q[2], q[3]);
        __m256i bytes[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                            _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
        __m256i nibbles[8]; /* the low nibbles of words 0-3 (values 0-15), then their high ones (16-31) */
        UNROLL
        for (int j = 0; j < 4; j++) {
            nibbles[j] = _mm256_and_si256(bytes[j], low);
            nibbles[4 + j] = _mm256_and_si256(_mm256_srli_epi16(bytes[j], 4), low);
        }
        __m256 wd = _mm256_cvtph_ps(_mm_set_epi16(
            (short)load_u16(row[7] + 18 * b), (short)load_u16(row[6] + 18 * b), (short)load_u16(row[5] + 18 * b),
            (short)load_u16(row[4] + 18 * b), (short)load_u16(row[3] + 18 * b), (short)load_u16(row[2] + 18 * b),
            (short)load_u16(row[1] + 18 * b), (short)load_u16(row[0] + 18 * b)));
        UNROLL
        for (int t = 0; t < nt; t++) {
            const int8_t *x = a->q + t * n + b * BLOCK;
            __m256i xs[8];
            UNROLL
            for (int j = 0; j < 8; j++) xs[j] = _mm256_set1_epi32(load_i32(x + 4 * j));
            __m256i sum = dot8_u4s8(_mm256_set1_epi32(a->c16[t * nb + b]), nibbles, xs);
            __m256 dd = _mm256_mul_ps(wd, _mm256_set1_ps(a->d[t * nb + b]));
            lasts[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), dd, lasts[t]);
        }
    }
}

/* A Q4_0R row's groups (of 16, 8 and 4 blocks), not its last 0-3 blocks: q4r_lasts8 takes those, eight rows at a
 * time */
ALWAYS_INLINE void dots_q4r_simd(const uint8_t *w, const QAct *a, int64_t n, int nt, __m256 *acc8) {
    int64_t nb = n / BLOCK, b = 0;
    UNROLL
    for (int t = 0; t < nt; t++) acc8[t] = _mm256_setzero_ps();
    for (; nb - b >= 16; b += 16) q4r_lanes8(w, b, 16, 0, a, n, nt, acc8), q4r_lanes8(w, b, 16, 1, a, n, nt, acc8);
    if (nb - b >= 8) q4r_lanes8(w, b, 8, 0, a, n, nt, acc8), b += 8;
    if (nb - b >= 4) q4r_lanes8(w, b, 4, 0, a, n, nt, acc8);
}

/* a group of 16 blocks for one or two tokens: q8r_lanes8's h = 0 and h = 1 in one pass over the group's lines,
 * in address order (the same int32 sums, and the same two multiply-adds per token in the same order): lines
 * asked for in order stream from DRAM faster than the halves read one after the other, for one or two tokens;
 * at 4 and 8 tokens the two are alike, and Q4_0R's groups (4 lines of nibbles) gain nothing (docs/speed.md). */
ALWAYS_INLINE void q8r_group16_inorder(const uint8_t *w, int per, int64_t b0, const QAct *a,
                                       int64_t n, int nt, __m256 *acc8) {
    const uint8_t *g = w + b0 * rg_block_bytes(per);
    __m256i isum[2][2];
    UNROLL
    for (int t = 0; t < nt; t++) isum[t][0] = q8r_start(a, n, t, b0), isum[t][1] = q8r_start(a, n, t, b0 + 8);
    UNROLL
    for (int j = 0; j < 8; j++) {
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(g + 64 * j)), u0 = q8r_weights(v0);
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(g + 64 * j + 32)), u1 = q8r_weights(v1);
        UNROLL
        for (int t = 0; t < nt; t++) {
            const int8_t *x = a->q16 + t * n + b0 * BLOCK + 64 * j;
            isum[t][0] = dot_u8s8(isum[t][0], u0, q8r_values(_mm256_loadu_si256((const __m256i *)x), v0));
            isum[t][1] = dot_u8s8(isum[t][1], u1, q8r_values(_mm256_loadu_si256((const __m256i *)(x + 32)), v1));
        }
    }
    UNROLL
    for (int h = 0; h < 2; h++) {
        __m256 wd = rg_scales8(g + 512 + 8 * rg_scale_bytes(per) * h, per);
        UNROLL
        for (int t = 0; t < nt; t++) {
            __m256 dd = rg_dd8(wd, rg_xd(a, n, per, t), per, b0 + 8 * h);
            acc8[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t][h]), dd, acc8[t]);
        }
    }
}

/* a row's blocks from b on that no group of 16 takes: a group of 8, one of 4, the last 0-3 blocks */
ALWAYS_INLINE void q8r_rest(const uint8_t *w, int per, int64_t b, const QAct *a, int64_t n, int nt, __m256 *acc8) {
    int64_t nb = n / BLOCK;
    if (nb - b >= 8) q8r_lanes8(w, per, b, 8, 0, a, n, nt, acc8), b += 8;
    if (nb - b >= 4) q8r_group4(w, per, b, a, n, nt, acc8), b += 4;
    for (; b < nb; b++) q8r_single(w, per, b, a, n, nt, acc8);
}

ALWAYS_INLINE void dots_q8r_simd(const uint8_t *w, int per, const QAct *a, int64_t n, int nt,
                                 __m256 *acc8) {
    int64_t nb = n / BLOCK, b = 0;
    UNROLL
    for (int t = 0; t < nt; t++) acc8[t] = _mm256_setzero_ps();
    for (; nb - b >= 16; b += 16)
        if (nt <= 2)
            q8r_group16_inorder(w, per, b, a, n, nt, acc8);
        else
            q8r_lanes8(w, per, b, 16, 0, a, n, nt, acc8), q8r_lanes8(w, per, b, 16, 1, a, n, nt, acc8);
    q8r_rest(w, per, b, a, n, nt, acc8);
}

/* dots_q8r_simd of rows a and b for one token, their groups of 16 taken in turn (row a's first, then row b's,
 * ...): two streams of weights at once, each row's arithmetic its own alone (see rows_q8r_pairs) */
ALWAYS_INLINE void dots_q8r_pair(const uint8_t *wa, const uint8_t *wb, int per, const QAct *a, int64_t n,
                                 __m256 *acc_a, __m256 *acc_b) {
    int64_t nb = n / BLOCK, b = 0;
    acc_a[0] = _mm256_setzero_ps(), acc_b[0] = _mm256_setzero_ps();
    for (; nb - b >= 16; b += 16) {
        q8r_group16_inorder(wa, per, b, a, n, 1, acc_a);
        q8r_group16_inorder(wb, per, b, a, n, 1, acc_b);
    }
    q8r_rest(wa, per, b, a, n, 1, acc_a);
    q8r_rest(wb, per, b, a, n, 1, acc_b);
}

/* q4r_lanes8's group of 4 (which fills half a vector) for two rows at once: lanes 0-3 row a's blocks, 4-7 row
 * b's, against the token's values repeated in both halves. Each lane's arithmetic is q4r_lanes8's (the same
 * int32 sums, conversion and multiply-add into the same partial sum of its row), so a row's result is the same
 * paired or alone. */
ALWAYS_INLINE __m256i q4r_both_halves(const void *p) { return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)); }

ALWAYS_INLINE void q4r_pair4(const uint8_t *wa, const uint8_t *wb, int64_t b0, const QAct *a, int64_t n, int nt,
                             __m256 *acc_a, __m256 *acc_b) {
    const uint8_t *ga = wa + b0 * 18, *gb = wb + b0 * 18;
    int64_t nb = n / BLOCK;
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i nibbles[8]; /* as q4r_lanes8's */
    UNROLL
    for (int j = 0; j < 4; j++) {
        __m256i v = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(gb + 16 * j)),
                                     _mm_loadu_si128((const __m128i *)(ga + 16 * j)));
        nibbles[j] = _mm256_and_si256(v, low);
        nibbles[4 + j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    __m256 wd = _mm256_cvtph_ps(_mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)(ga + 64)),
                                                   _mm_loadl_epi64((const __m128i *)(gb + 64))));
    UNROLL
    for (int t = 0; t < nt; t++) {
        const int8_t *x = a->q16 + t * n + b0 * BLOCK;
        __m256i xs[8];
        UNROLL
        for (int j = 0; j < 8; j++) xs[j] = q4r_both_halves(x + 16 * j);
        __m256i sum = dot8_u4s8(q4r_both_halves(a->c16 + t * nb + b0), nibbles, xs);
        __m256 xd = _mm256_castsi256_ps(q4r_both_halves(a->d + t * nb + b0));
        __m256 p = _mm256_permute2f128_ps(acc_a[t], acc_b[t], 0x20); /* the two rows' lanes 0-3 */
        p = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(wd, xd), p);
        acc_a[t] = _mm256_permute2f128_ps(p, acc_a[t], 0x30);
        acc_b[t] = _mm256_permute2f128_ps(p, acc_b[t], 0x31);
    }
}

/* dots_q4r_simd of rows a and b (whose groups include one of 4), that group paired (q4r_pair4); their last blocks
 * are q4r_lasts8's */
ALWAYS_INLINE void dots_q4r_pair(const uint8_t *wa, const uint8_t *wb, const QAct *a, int64_t n, int nt,
                                 __m256 *acc_a, __m256 *acc_b) {
    int64_t nb = n / BLOCK, b = 0;
    UNROLL
    for (int t = 0; t < nt; t++) acc_a[t] = acc_b[t] = _mm256_setzero_ps();
    for (; nb - b >= 16; b += 16) {
        q4r_lanes8(wa, b, 16, 0, a, n, nt, acc_a), q4r_lanes8(wa, b, 16, 1, a, n, nt, acc_a);
        q4r_lanes8(wb, b, 16, 0, a, n, nt, acc_b), q4r_lanes8(wb, b, 16, 1, a, n, nt, acc_b);
    }
    if (nb - b >= 8) q4r_lanes8(wa, b, 8, 0, a, n, nt, acc_a), q4r_lanes8(wb, b, 8, 0, a, n, nt, acc_b), b += 8;
    q4r_pair4(wa, wb, b, a, n, nt, acc_a, acc_b);
}
#endif
#endif

#ifdef HAVE_ZMM_INT8
static inline __mmask64 first_bytes(int64_t k) { return k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << k) - 1); }

/* bytes [0, 72) of four Q4_0 blocks (or fewer: the rest read as zeros, without touching memory past them) */
ALWAYS_INLINE void load_blocks(const uint8_t *p, int64_t bytes, __m512i *a0, __m512i *a1) {
    *a0 = bytes >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(first_bytes(bytes), p);
    *a1 = bytes > 64 ? _mm512_maskz_loadu_epi8(first_bytes(bytes - 64), p + 64) : _mm512_setzero_si512();
}

/* Byte-permute indices (for each output byte, which of the 128 input bytes of two registers it takes), made
 * once: Q4_0's four blocks' 16 bytes of nibbles, and two steps' scales as their folded sums' lanes need them;
 * Q8_0's two blocks' 32 values and their scales each over 8 lanes. */
static uint8_t Q4_QS_INDEX[64], Q4_D2_INDEX[64], Q8_QS_INDEX[64], Q8_D_INDEX[64];

static void block_index(uint8_t *idx, int64_t block_bytes, int64_t per_block, int64_t first) {
    for (int j = 0; j < 64; j++) idx[j] = (uint8_t)(block_bytes * (j / per_block) + first + j % per_block);
}

static void scale_index(uint8_t *idx, int64_t block_bytes, int lanes) {
    for (int j = 0; j < 64; j++) idx[j] = (uint8_t)(block_bytes * ((j / 2) / lanes) + j % 2);
}

__attribute__((constructor)) static void make_indices(void) {
    for (int j = 0; j < 64; j++) { /* Q4_0: the blocks interleaved 4 bytes at a time */
        Q4_QS_INDEX[j] = (uint8_t)(18 * ((j / 4) % 4) + 2 + 4 * (j / 16) + j % 4);
        /* two steps' scales out of the first register of each (indices 0-63 and 64-127): fp16 number e < 16
         * (lane e of the fold) is step e / 8's block e % 4; bytes 32-63 unused */
        Q4_D2_INDEX[j] = (uint8_t)(64 * ((j / 16) % 2) + 18 * ((j / 2) % 4) + j % 2);
    }
    block_index(Q8_QS_INDEX, 34, 32, 2);
    scale_index(Q8_D_INDEX, 34, 8);
}

/* Q4_0 on the Q4_0 activation layout (see QAct), two steps of four blocks at a time. Per step, one byte permute
 * gathers the four blocks' 64 bytes of nibbles out of their 72 (interleaved 4 bytes at a time), and low and high
 * nibbles (unsigned) meet the activations in two vpdpbusd: 16 int32 lanes, lane l of block l % 4, starting at
 * the blocks' corrections (-8 * sum of x). The two steps' lanes are then folded into one register (128-bit
 * quarters 0 + 2 and 1 + 3 of each: lanes 0-7 the first step, 8-15 the second, block l % 4), so that the
 * conversion to float and the scaling by d_w * d_x (one permute gathers both steps' eight fp16 scales) cost one
 * instruction each per eight blocks instead of per four. A row is read front to back (one row at a time: rows
 * interleaved read DRAM slower), and its operations do not depend on the token count. */
ALWAYS_INLINE void q4_zmm_load(const uint8_t *p, int64_t bytes, __m512i *a0, __m512i *a1) {
    if (bytes >= 72) { /* a full step: the permutes read bytes 64..71 of the second register only */
        *a0 = _mm512_loadu_si512(p);
        *a1 = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(p + 64)));
    } else if (bytes > 0) {
        load_blocks(p, bytes, a0, a1);
    } else {
        *a0 = *a1 = _mm512_setzero_si512();
    }
}

/* 64 bytes of int8 or 4-bit weights as two 256-bit loads put together, for the products that stream a matrix
 * from DRAM. With the weights 16 bytes into a cache line, where NumPy's large buffers begin, a 512-bit load
 * spans two lines; one Zen 4 core streams the products from DRAM faster with two 256-bit loads than with one
 * 512-bit load (at other offsets too), and products that are DRAM-bound on every core or stay in cache run alike
 * either way (docs/speed.md). On a Sapphire Rapids-class Xeon the two ways stream alike (within 3%). */
ALWAYS_INLINE __m512i load_weights512(const uint8_t *p) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)),
                              _mm256_loadu_si256((const __m256i *)(p + 32)), 1);
}

/* the high nibble of every byte: one GF(2) affine map where the CPU has it (bit i of the result is bit i + 4) */
ALWAYS_INLINE __m512i high_nibbles(__m512i v) {
#ifdef __GFNI__
    return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000LL), 0);
#else
    return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
#endif
}

/* steps k and k + 1 of one row (bytes0, bytes1: how many of their 72 bytes exist; bytes1 = 0: step k alone, the
 * second half of the fold zero) for nt tokens */
ALWAYS_INLINE void q4_zmm_steps(const uint8_t *w, int64_t k, int64_t bytes0, int64_t bytes1, const QAct *a, int nt,
                                __m512 *acc) {
    const __m512i qs_idx = _mm512_loadu_si512(Q4_QS_INDEX), d_idx = _mm512_loadu_si512(Q4_D2_INDEX);
    __m512i a0[2], a1[2], lo[2], hi[2];
    q4_zmm_load(w + k * 72, bytes0, &a0[0], &a1[0]);
    q4_zmm_load(w + k * 72 + 72, bytes1, &a0[1], &a1[1]);
    UNROLL
    for (int j = 0; j < 2; j++) {
        __m512i qs = _mm512_permutex2var_epi8(a0[j], qs_idx, a1[j]);
        lo[j] = _mm512_and_si512(qs, _mm512_set1_epi8(0x0F));
        hi[j] = high_nibbles(qs);
    }
    __m512 wd = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(a0[0], d_idx, a0[1])));
    UNROLL
    for (int t = 0; t < nt; t++) {
        const int8_t *x = a->q4 + t * a->q4_stride + k * 128;
        const int32_t *c = a->c4 + t * a->c4_stride + k * 4;
        __m512i s[2];
        UNROLL
        for (int j = 0; j < 2; j++) {
            if (j == 1 && bytes1 == 0) {
                s[1] = _mm512_setzero_si512();
                break;
            }
            s[j] = _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i *)(c + 4 * j)));
            s[j] = _mm512_dpbusd_epi32(s[j], lo[j], _mm512_loadu_si512(x + 128 * j));
            s[j] = _mm512_dpbusd_epi32(s[j], hi[j], _mm512_loadu_si512(x + 128 * j + 64));
        }
        __m512i v = _mm512_add_epi32(_mm512_shuffle_i32x4(s[0], s[1], 0x44), _mm512_shuffle_i32x4(s[0], s[1], 0xEE));
        __m512 xd = _mm512_loadu_ps(a->d4 + t * a->d4_stride + k * 8);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(wd, xd), acc[t]);
    }
}

/* a lone last block g (rows of 8k + 1 blocks, such as dim 288's nine): its 32 products in one 256-bit vpdpbusd
 * on the plain activations (low nibbles meet values 0-15, high ones 16-31), converted and scaled in the low half
 * of the accumulators: a fraction of a whole step's work */
ALWAYS_INLINE void q4_last_block(const uint8_t *w, int64_t g, const QAct *a, int64_t n, int nt, __m512 *acc) {
    const uint8_t *block = w + g * 18;
    __m128i q = _mm_loadu_si128((const __m128i *)(block + 2)), low = _mm_set1_epi8(0x0F);
    __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
    float wd = fp16_to_f32(load_u16(block));
    UNROLL
    for (int t = 0; t < nt; t++) {
        __m256i s = _mm256_zextsi128_si256(_mm_cvtsi32_si128(a->c4[t * a->c4_stride + g]));
        s = _mm256_dpbusd_epi32(s, u, _mm256_loadu_si256((const __m256i *)(a->q + t * n + g * BLOCK)));
        acc[t] = _mm512_fmadd_ps(_mm512_zextps256_ps512(_mm256_cvtepi32_ps(s)),
                                 _mm512_set1_ps(wd * a->d[t * (n / BLOCK) + g]), acc[t]);
    }
}

ALWAYS_INLINE void dots_q4_simd(const uint8_t *w, int64_t nb, const QAct *a, int nt, __m512 *acc) {
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; 4 * k + 8 <= nb; k += 2) q4_zmm_steps(w, k, 72, 72, a, nt, acc);
    int64_t left = nb - 4 * k; /* blocks, < 8 */
    if (left > 4) q4_zmm_steps(w, k, 72, (left - 4) * 18, a, nt, acc);
    else if (left > 1) q4_zmm_steps(w, k, left * 18, 0, a, nt, acc);
    else if (left == 1) q4_last_block(w, 4 * k, a, nb * BLOCK, nt, acc);
}

/* Q4_0R (see W_Q4_0R) on the activations regrouped the same way (q16): a group of 16 blocks in 8 vpdpbusd per
 * token (four vectors' low nibbles, then their high ones, meeting the values 16 bytes further on), each block's
 * int32 sum in its own lane, started at its correction; then one conversion and one multiply-add by d_w * d_x
 * per group. */
ALWAYS_INLINE void q4r_group16(const uint8_t *w, int64_t b0, const QAct *a, int64_t n, int nt, __m512 *acc) {
    const uint8_t *g = w + b0 * 18;
    int64_t nb = n / BLOCK;
    __m512i lo[4], hi[4];
    UNROLL
    for (int j = 0; j < 4; j++) {
        __m512i v = load_weights512(g + 64 * j);
        lo[j] = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
        hi[j] = high_nibbles(v);
    }
    __m512 wd = _mm512_setzero_ps();
    UNROLL
    for (int t = 0; t < nt; t++) {
        const int8_t *x = a->q16 + t * n + b0 * BLOCK;
        __m512i s0 = _mm512_loadu_si512(a->c16 + t * nb + b0), s1 = _mm512_setzero_si512();
        UNROLL
        for (int v = 0; v < 8; v += 2) {
            s0 = _mm512_dpbusd_epi32(s0, v < 4 ? lo[v] : hi[v - 4], _mm512_loadu_si512(x + 64 * v));
            s1 = _mm512_dpbusd_epi32(s1, v < 4 ? lo[v + 1] : hi[v - 3], _mm512_loadu_si512(x + 64 * v + 64));
        }
        if (t == 0) wd = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(g + 256))); /* Q8R_SCALES_LATE */
        __m512 xd = _mm512_loadu_ps(a->d + t * nb + b0);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(wd, xd), acc[t]);
    }
}

/* Q8_0R (see W_Q8_0R) on the activations regrouped the same way (q16), in 512-bit registers: the weights read as
 * unsigned (w + 128), each block's int32 sum in its own lane(s), started at its correction -128 * (sum of its
 * values) (16 times Q4_0's -8 * sum). A group's `vectors` registers of weights, flipped to unsigned: */
ALWAYS_INLINE void q8r_unsigned(const uint8_t *g, int vectors, __m512i *u) {
    UNROLL
    for (int j = 0; j < vectors; j++) u[j] = _mm512_xor_si512(load_weights512(g + 64 * j), _mm512_set1_epi8((char)0x80));
}

/* and their int32 sums with the activations at x, from the corrections c, in two chains.
 * Q8R_SCALES_LATE: a group's scales (the bytes after its values) are read after the first token's sums, so
 * that the group's lines are asked for in order (Q4_0R's groups of 16 too). Read first (where the compiler puts
 * them when they come before the token loop), the group's last line is asked for before its middle ones, and a
 * matrix streams from DRAM markedly slower (docs/speed.md). */
ALWAYS_INLINE __m512i q8r_sums(const __m512i *u, int vectors, const int8_t *x, __m512i c) {
    __m512i s0 = c, s1 = _mm512_setzero_si512();
    UNROLL
    for (int j = 0; j < vectors; j += 2) {
        s0 = _mm512_dpbusd_epi32(s0, u[j], _mm512_loadu_si512(x + 64 * j));
        s1 = _mm512_dpbusd_epi32(s1, u[j + 1], _mm512_loadu_si512(x + 64 * j + 64));
    }
    return _mm512_add_epi32(s0, s1);
}

/* a Q4_0R group of 8 blocks: 4 vpdpbusd per token (q8r_sums) instead of q4r_lanes8's 8, register k's lanes 0-7
 * meeting the values of the group's vector 2k (low nibbles) or 2k - 4 (high) and lanes 8-15 those of the next one;
 * the two halves' int32 sums added (the same integers as q4r_lanes8's), then q4r_lanes8's conversion and
 * multiply-add into acc8 */
ALWAYS_INLINE void q4r_group8(const uint8_t *w, int64_t b0, const QAct *a, int64_t n, int nt, __m256 *acc8) {
    const uint8_t *g = w + b0 * 18;
    int64_t nb = n / BLOCK;
    __m512i nibbles[4]; /* vectors 0-1 and 2-3: their low nibbles, then their high ones */
    UNROLL
    for (int j = 0; j < 2; j++) {
        __m512i v = load_weights512(g + 64 * j);
        nibbles[j] = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
        nibbles[2 + j] = high_nibbles(v);
    }
    __m256 wd = _mm256_setzero_ps();
    UNROLL
    for (int t = 0; t < nt; t++) {
        __m256i c = _mm256_loadu_si256((const __m256i *)(a->c16 + t * nb + b0));
        __m512i s = q8r_sums(nibbles, 4, a->q16 + t * n + b0 * BLOCK, _mm512_zextsi256_si512(c));
        if (t == 0) wd = rg_scales8(g + 128, 0); /* see Q8R_SCALES_LATE */
        __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
        acc8[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s8), rg_dd8(wd, a->d + t * nb, 0, b0), acc8[t]);
    }
}

/* A Q4_0R row's groups (of 16, 8 and 4 blocks), not its last 0-3 blocks: q4r_lasts16 takes those, sixteen rows
 * at a time */
ALWAYS_INLINE void dots_q4r_simd(const uint8_t *w, const QAct *a, int64_t n, int nt, __m512 *acc) {
    int64_t nb = n / BLOCK, b = 0;
    __m256 acc8[8];
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps(), acc8[t] = _mm256_setzero_ps();
    for (; nb - b >= 16; b += 16) q4r_group16(w, b, a, n, nt, acc);
    if (nb - b >= 8) q4r_group8(w, b, a, n, nt, acc8), b += 8;
    if (nb - b >= 4) q4r_lanes8(w, b, 4, 0, a, n, nt, acc8);
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm512_add_ps(acc[t], _mm512_zextps256_ps512(acc8[t]));
}

/* The last 0-3 blocks of 16 Q4_0R rows (see W_Q4_0R: left as they are), rows r at w + r * rb, for nt tokens: lane
 * r of lasts[t] gets the sum over row r's last blocks of (the block's exact int32 sum) * (d_w * d_x),
 * multiply-added in block order from zero; the caller adds it to the hsum16 of the row's groups. Kept apart from
 * the groups' lanes so that sixteen rows' blocks are one vector's work: four vectors of four rows' 16 bytes of
 * nibbles, transposed 4 bytes at a time, leave bytes 4j..4j+3 of every row's block in its row's lane of vector
 * j, whose low and high nibbles each meet the same four values in every lane (one vpdpbusd on broadcast
 * values), and the block's sum is the lane's, with no horizontal adds. Each lane's operations are those of a row
 * alone, so a row's result does not depend on the rows beside it (rows past `count` repeat the last one, in
 * lanes the caller leaves). Taken a row at a time, such a block took a fifth of a 9-block row's time (a 15M
 * model's rows); this way, an eighth (docs/speed.md). */
ALWAYS_INLINE void q4r_lasts16(const uint8_t *w, int64_t rb, int count, const QAct *a, int64_t n, int nt,
                               __m512 *lasts) {
    int64_t nb = n / BLOCK;
    const uint8_t *row[16];
    for (int r = 0; r < 16; r++) row[r] = w + (r < count ? r : count - 1) * rb;
    const __m512i low = _mm512_set1_epi8(0x0F);
    /* each lane's row's offset from row 0 (an int32 for rows of up to 200 million weights) */
    __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i at = _mm512_mullo_epi32(_mm512_min_epi32(lane, _mm512_set1_epi32(count - 1)), _mm512_set1_epi32((int)rb));
    UNROLL
    for (int t = 0; t < nt; t++) lasts[t] = _mm512_setzero_ps();
    for (int64_t b = nb - nb % 4; b < nb; b++) {
        __m512i q[4]; /* q[k]'s 128-bit lane L: row 4L + k's nibbles */
        for (int k = 0; k < 4; k++) {
            __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(row[k] + 18 * b + 2)));
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(row[4 + k] + 18 * b + 2)), 1);
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(row[8 + k] + 18 * b + 2)), 2);
            q[k] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(row[12 + k] + 18 * b + 2)), 3);
        }
        /* the 4 x 4 transpose of 4-byte words within each 128-bit lane: lane 4L + k of bytes[j] is row 4L + k's
         * word j */
        __m512i t0 = _mm512_unpacklo_epi32(q[0], q[1]), t1 = _mm512_unpackhi_epi32(q[0], q[1]);
        __m512i t2 = _mm512_unpacklo_epi32(q[2], q[3]), t3 = _mm512_unpackhi_epi32(q[2], q[3]);
        __m512i bytes[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                            _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
        __m512i lo[4], hi[4];
        UNROLL
        for (int j = 0; j < 4; j++) lo[j] = _mm512_and_si512(bytes[j], low), hi[j] = high_nibbles(bytes[j]);
        /* the 16 rows' fp16 scales: the low halves of 4-byte words gathered at the blocks' starts (on a Sapphire
         * Rapids-class Xeon 5% faster than 16 loads; CPUs that run Downfall's microcode fix, Ice Lake and Tiger
         * Lake among these builds', gather slower: not measured) */
        __m512 wd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(at, w + 18 * b, 1)));
        UNROLL
        for (int t = 0; t < nt; t++) {
            const int8_t *x = a->q + t * n + b * BLOCK; /* low nibbles meet values 0-15, high ones 16-31 */
            __m512i s0 = _mm512_set1_epi32(a->c16[t * nb + b]), s1 = _mm512_setzero_si512();
            UNROLL
            for (int j = 0; j < 4; j++) {
                s0 = _mm512_dpbusd_epi32(s0, lo[j], _mm512_set1_epi32(load_i32(x + 4 * j)));
                s1 = _mm512_dpbusd_epi32(s1, hi[j], _mm512_set1_epi32(load_i32(x + 16 + 4 * j)));
            }
            __m512 dd = _mm512_mul_ps(wd, _mm512_set1_ps(a->d[t * nb + b]));
            lasts[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), dd, lasts[t]);
        }
    }
}

/* the weight scales of blocks b..b+15, and per token d_w * d_x (see rg_scales8, rg_dd8) */
ALWAYS_INLINE __m512 rg_scales16(const uint8_t *p, int per) {
    if (!per) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    if (per == 1) return _mm512_loadu_ps((const float *)p);
    return _mm512_castps256_ps512(_mm256_loadu_ps((const float *)p));
}

ALWAYS_INLINE __m512 rg_dd16(__m512 wd, const float *xd, int per, int64_t b) {
    if (per < 2) return _mm512_mul_ps(wd, _mm512_loadu_ps(xd + b));
    __m256 eight = _mm256_mul_ps(_mm512_castps512_ps256(wd), _mm256_loadu_ps(xd + b / 2));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                                 _mm512_castps256_ps512(eight));
}

/* a group of 16 blocks: 8 vpdpbusd per token, then one conversion and one multiply-add by d_w * d_x */
ALWAYS_INLINE void q8r_group16(const uint8_t *w, int per, int64_t b0, const QAct *a, int64_t n,
                               int nt, __m512 *acc) {
    const uint8_t *g = w + b0 * rg_block_bytes(per);
    int64_t nb = n / BLOCK;
    __m512i u[8];
    q8r_unsigned(g, 8, u);
    __m512 wd = _mm512_setzero_ps();
    UNROLL
    for (int t = 0; t < nt; t++) {
        __m512i c = _mm512_slli_epi32(_mm512_loadu_si512(a->c16 + t * nb + b0), 4);
        __m512i s = q8r_sums(u, 8, a->q16 + t * n + b0 * BLOCK, c);
        if (t == 0) wd = rg_scales16(g + 512, per); /* see Q8R_SCALES_LATE */
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), rg_dd16(wd, rg_xd(a, n, per, t), per, b0), acc[t]);
    }
}

/* a group of 8 blocks: 4 vpdpbusd per token, register k's lanes 0-7 meeting values 8k..8k+3 of blocks 0-7 and
 * lanes 8-15 values 8k+4..8k+7; the two halves' int32 sums added, then as q8r_lanes8 into acc8 */
ALWAYS_INLINE void q8r_group8(const uint8_t *w, int per, int64_t b0, const QAct *a, int64_t n,
                              int nt, __m256 *acc8) {
    const uint8_t *g = w + b0 * rg_block_bytes(per);
    int64_t nb = n / BLOCK;
    __m512i u[4];
    q8r_unsigned(g, 4, u);
    __m256 wd = _mm256_setzero_ps();
    UNROLL
    for (int t = 0; t < nt; t++) {
        __m256i c = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(a->c16 + t * nb + b0)), 4);
        __m512i s = q8r_sums(u, 4, a->q16 + t * n + b0 * BLOCK, _mm512_zextsi256_si512(c));
        if (t == 0) wd = rg_scales8(g + 256, per); /* see Q8R_SCALES_LATE */
        __m256i s8 = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
        acc8[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s8), rg_dd8(wd, rg_xd(a, n, per, t), per, b0), acc8[t]);
    }
}

ALWAYS_INLINE void dots_q8r_simd(const uint8_t *w, int per, const QAct *a, int64_t n, int nt,
                                 __m512 *acc) {
    int64_t nb = n / BLOCK, b = 0;
    __m256 acc8[8];
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps(), acc8[t] = _mm256_setzero_ps();
    for (; nb - b >= 16; b += 16) q8r_group16(w, per, b, a, n, nt, acc);
    if (nb - b >= 8) q8r_group8(w, per, b, a, n, nt, acc8), b += 8;
    if (nb - b >= 4) q8r_group4(w, per, b, a, n, nt, acc8), b += 4;
    for (; b < nb; b++) q8r_single(w, per, b, a, n, nt, acc8);
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm512_add_ps(acc[t], _mm512_zextps256_ps512(acc8[t]));
}

/* Rows of one group of 4 Q4_0R blocks (n = 128: a dim-128 model's), four at a time (row r at w + r * rb):
 * q4r_lanes8's group of 4 fills a quarter of a 512-bit vector, so lanes 4r..4r+3 hold row r's blocks, against
 * the token's values repeated in every quarter. Each lane's arithmetic is q4r_lanes8's (the same int32 sums,
 * conversion and multiply-add), and row r's partial sums leave in lanes 0-3 of acc[r][t], the rest zero, as
 * dots_q4r_simd leaves them: a row's result is the same in a quad or alone. Rows with other groups before or
 * after a group of 4 go alone: passing their partial sums through the quad's lanes and back is slower than the
 * rows alone at 8 tokens. */
ALWAYS_INLINE __m512i q4r_quarters(const void *p) { return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p)); }

ALWAYS_INLINE __m512i q4r_rows4(const uint8_t *p, int64_t rb) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + rb)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * rb)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * rb)), 3);
}

ALWAYS_INLINE void dots_q4r_quad(const uint8_t *w, int64_t rb, const QAct *a, int nt, __m512 acc[4][8]) {
    __m512i lo[4], hi[4];
    UNROLL
    for (int j = 0; j < 4; j++) {
        __m512i v = q4r_rows4(w + 16 * j, rb);
        lo[j] = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
        hi[j] = high_nibbles(v);
    }
#define Q4R_SCALES(r) _mm_loadl_epi64((const __m128i *)(w + (r) * rb + 64))
    __m512 wd = _mm512_cvtph_ps(_mm256_set_m128i(_mm_unpacklo_epi64(Q4R_SCALES(2), Q4R_SCALES(3)),
                                                 _mm_unpacklo_epi64(Q4R_SCALES(0), Q4R_SCALES(1))));
#undef Q4R_SCALES
    UNROLL
    for (int t = 0; t < nt; t++) {
        const int8_t *x = a->q16 + t * 4 * BLOCK;
        __m512i s0 = q4r_quarters(a->c16 + t * 4), s1 = _mm512_setzero_si512();
        s0 = _mm512_dpbusd_epi32(s0, lo[0], q4r_quarters(x));
        s1 = _mm512_dpbusd_epi32(s1, lo[1], q4r_quarters(x + 16));
        s0 = _mm512_dpbusd_epi32(s0, lo[2], q4r_quarters(x + 32));
        s1 = _mm512_dpbusd_epi32(s1, lo[3], q4r_quarters(x + 48));
        s0 = _mm512_dpbusd_epi32(s0, hi[0], q4r_quarters(x + 64));
        s1 = _mm512_dpbusd_epi32(s1, hi[1], q4r_quarters(x + 80));
        s0 = _mm512_dpbusd_epi32(s0, hi[2], q4r_quarters(x + 96));
        s1 = _mm512_dpbusd_epi32(s1, hi[3], q4r_quarters(x + 112));
        __m512 xd = _mm512_castsi512_ps(q4r_quarters(a->d + t * 4));
        __m512 p = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(wd, xd),
                                   _mm512_setzero_ps());
        acc[0][t] = _mm512_zextps128_ps512(_mm512_castps512_ps128(p));
        acc[1][t] = _mm512_zextps128_ps512(_mm512_extractf32x4_ps(p, 1));
        acc[2][t] = _mm512_zextps128_ps512(_mm512_extractf32x4_ps(p, 2));
        acc[3][t] = _mm512_zextps128_ps512(_mm512_extractf32x4_ps(p, 3));
    }
}

/* llama.cpp's Q8_0, two blocks a step: the 64 int8 weights gathered out of 68 bytes and read as unsigned
 * (w + 128, the correction -128 * sum of x starts each block's sum), the scales repeated over 8 lanes */
ALWAYS_INLINE void dots_q8_blocks_simd(const uint8_t *w, int64_t nb, const QAct *a, int nt, __m512 *acc) {
    const __m512i qs_idx = _mm512_loadu_si512(Q8_QS_INDEX), d_idx = _mm512_loadu_si512(Q8_D_INDEX);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t step = 0; step < (nb + 1) / 2; step++) {
        __m512i a0, a1;
        int64_t left = (nb - 2 * step) * 34;
        load_blocks(w + step * 68, left < 68 ? left : 68, &a0, &a1);
        __m512i u = _mm512_xor_si512(_mm512_permutex2var_epi8(a0, qs_idx, a1), flip);
        __m512 wd = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(a0, d_idx, a1)));
        UNROLL
        for (int t = 0; t < nt; t++) {
            __m512i s = _mm512_loadu_si512(a->c8 + t * a->c8_stride + step * 16);
            s = _mm512_dpbusd_epi32(s, u, _mm512_loadu_si512(a->q + t * nb * 32 + step * 64));
            __m512 scale = _mm512_mul_ps(wd, _mm512_loadu_ps(a->d8 + t * a->d8_stride + step * 16));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[t]);
        }
    }
}

/* runq.c's Q8_0 with groups of 64, two groups a step: each group's 64 weights read as unsigned (w + 128, the
 * correction -128 * sum of x starts its int32 sum) in one vpdpbusd, then the two groups' 16 lanes folded into one
 * register (128-bit quarters 0 + 1 and 2 + 3 of each: lanes 0-7 the first group, 8-15 the second), so that the
 * conversion to float and the scaling by w_s * x_s cost one instruction each per two groups. An odd last group
 * is folded with zeros. A row's operations do not depend on the token count. */
ALWAYS_INLINE void q8_g64_step(const uint8_t *w, const float *ws, int64_t g, int both, const QAct *a, int64_t n,
                               int nt, __m512 *acc) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512i u0 = _mm512_xor_si512(load_weights512(w + g * 64), flip);
    __m512i u1 = both ? _mm512_xor_si512(load_weights512(w + g * 64 + 64), flip) : _mm512_setzero_si512();
    __m128 pair = both ? _mm_castpd_ps(_mm_load_sd((const double *)(ws + g))) : _mm_load_ss(ws + g);
    __m512 wsv = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(pair));
    UNROLL
    for (int t = 0; t < nt; t++) {
        const int8_t *x = a->q + t * n + g * 64;
        const int32_t *c = a->c8 + t * a->c8_stride + g;
        __m512i s0 = _mm512_dpbusd_epi32(_mm512_zextsi128_si512(_mm_cvtsi32_si128(c[0])), u0, _mm512_loadu_si512(x));
        __m512i s1 = both ? _mm512_dpbusd_epi32(_mm512_zextsi128_si512(_mm_cvtsi32_si128(c[1])), u1,
                                                _mm512_loadu_si512(x + 64))
                          : _mm512_setzero_si512();
        __m512i v = _mm512_add_epi32(_mm512_shuffle_i32x4(s0, s1, 0x44), _mm512_shuffle_i32x4(s0, s1, 0xEE));
        __m512 xd = _mm512_loadu_ps(a->d8 + t * a->d8_stride + g * 8);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(wsv, xd), acc[t]);
    }
}

ALWAYS_INLINE void dots_q8_g64_simd(const uint8_t *w, const float *ws, const QAct *a, int64_t n, int nt,
                                    __m512 *acc) {
    int64_t n_groups = n / 64, g = 0;
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    for (; g + 2 <= n_groups; g += 2) q8_g64_step(w, ws, g, 1, a, n, nt, acc);
    if (g < n_groups) q8_g64_step(w, ws, g, 0, a, n, nt, acc);
}

/* runq.c's Q8_0 with groups of 32: 64 weights (two groups, lanes 0-7 and 8-15) a vpdpbusd, read as unsigned
 * (w + 128); two registers' sums folded into one (128-bit quarters 0 + 1 and 2 + 3 of each: quarter j is group
 * j of the four), the four groups' corrections (-128 * sum of x, at lanes 0, 4, 8, 12) added in one load, then
 * converted and scaled by w_s * x_s once per four groups. Starting each register's sums at its two corrections
 * instead would take a load more per 64 weights, on the port a step of 8 or more tokens waits on (the same
 * int32 sums; docs/speed.md). A last odd register is folded with zeros. */
ALWAYS_INLINE void q8_g32_step(const uint8_t *w, const float *ws, int64_t g, int64_t groups, const QAct *a,
                               int64_t n, int nt, __m512 *acc) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i quarters = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    int64_t bytes = groups * 32;
    /* the weights of missing groups read as zeros (unsigned: after the flip) */
    __m512i u0 = _mm512_setzero_si512();
    if (bytes >= 64) u0 = _mm512_xor_si512(load_weights512(w + g * 32), flip);
    else u0 = _mm512_maskz_mov_epi8(first_bytes(bytes), _mm512_xor_si512(_mm512_maskz_loadu_epi8(
                                                                       first_bytes(bytes), w + g * 32), flip));
    __m512i u1 = _mm512_setzero_si512();
    if (bytes >= 128) u1 = _mm512_xor_si512(load_weights512(w + g * 32 + 64), flip);
    else if (bytes > 64)
        u1 = _mm512_maskz_mov_epi8(first_bytes(bytes - 64),
                                   _mm512_xor_si512(_mm512_maskz_loadu_epi8(first_bytes(bytes - 64), w + g * 32 + 64),
                                                    flip));
    __m128 s4 = groups >= 4 ? _mm_loadu_ps(ws + g) : _mm_maskz_loadu_ps((__mmask8)((1u << groups) - 1), ws + g);
    __m512 wsv = _mm512_permutexvar_ps(quarters, _mm512_castps128_ps512(s4));
    UNROLL
    for (int t = 0; t < nt; t++) {
        const int8_t *x = a->q + t * n + g * 32;
        const int32_t *c = a->c32 + t * a->c32_stride + g * 4;
        __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, _mm512_loadu_si512(x));
        __m512i s1 = bytes > 64 ? _mm512_dpbusd_epi32(_mm512_setzero_si512(), u1, _mm512_loadu_si512(x + 64))
                                : _mm512_setzero_si512();
        __m512i v = _mm512_add_epi32(_mm512_shuffle_i32x4(s0, s1, 0x88), _mm512_shuffle_i32x4(s0, s1, 0xDD));
        v = _mm512_add_epi32(v, _mm512_loadu_si512(c));
        __m512 xd = _mm512_loadu_ps(a->d32 + t * a->d32_stride + g * 4);
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(wsv, xd), acc[t]);
    }
}

/* q8_g32_step for a row's last group alone (rows of 288 values: nine groups) in 256- and 128-bit arithmetic:
 * its lanes' sums, conversion and scaling are those of a whole step's quarter 0, the other lanes of the
 * multiply-add by zero as there, so a row gets the same result at half the step's cost */
ALWAYS_INLINE void q8_g32_last(const uint8_t *w, const float *ws, int64_t g, const QAct *a, int64_t n, int nt,
                               __m512 *acc) {
    __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + g * 32)), _mm256_set1_epi8((char)0x80));
    __m128 wsv = _mm_set1_ps(ws[g]);
    UNROLL
    for (int t = 0; t < nt; t++) {
        __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u,
                                        _mm256_loadu_si256((const __m256i *)(a->q + t * n + g * 32)));
        __m128i v = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        v = _mm_add_epi32(v, _mm_loadu_si128((const __m128i *)(a->c32 + t * a->c32_stride + g * 4)));
        __m128 scale = _mm_mul_ps(wsv, _mm_loadu_ps(a->d32 + t * a->d32_stride + g * 4));
        acc[t] = _mm512_fmadd_ps(_mm512_zextps128_ps512(_mm_cvtepi32_ps(v)), _mm512_zextps128_ps512(scale), acc[t]);
    }
}

ALWAYS_INLINE void dots_q8_g32_simd(const uint8_t *w, const float *ws, const QAct *a, int64_t n, int nt,
                                    __m512 *acc) {
    int64_t n_groups = n / 32, g = 0;
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    for (; g + 4 <= n_groups; g += 4) q8_g32_step(w, ws, g, 4, a, n, nt, acc);
    if (g + 1 == n_groups) q8_g32_last(w, ws, g, a, n, nt, acc);
    else if (g < n_groups) q8_g32_step(w, ws, g, n_groups - g, a, n, nt, acc);
}

/* runq.c's Q8_0 with groups of a multiple of 64: 64 weights a vpdpbusd, read as unsigned (w + 128, the
 * correction -128 * sum of x starts each group's sum) */
ALWAYS_INLINE void dots_q8_simd(const uint8_t *w, const float *ws, const QAct *a, int64_t n, int nt, __m512 *acc) {
    int64_t gs = a->gs, n_groups = n / gs;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; g++) {
        __m512i isum[8];
        UNROLL
        for (int t = 0; t < nt; t++) isum[t] = _mm512_zextsi128_si512(_mm_cvtsi32_si128(a->c8[t * a->c8_stride + g]));
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 64) {
            __m512i u = _mm512_xor_si512(load_weights512(w + k), flip);
            UNROLL
            for (int t = 0; t < nt; t++) isum[t] = _mm512_dpbusd_epi32(isum[t], u, _mm512_loadu_si512(a->q + t * n + k));
        }
        UNROLL
        for (int t = 0; t < nt; t++)
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_set1_ps(ws[g] * a->d[t * n_groups + g]),
                                     acc[t]);
    }
}
#endif

/* Rows [lo, hi) of a quantized m for nt <= 8 tokens (activations a, already offset to the first of them): each
 * kernel is instantiated per token count with its row loop inside, so that a row costs its arithmetic and
 * little else. out: the first token's results, `stride` apart from one token to the next. */
typedef void (*RowsFn)(const Mat *m, int64_t lo, int64_t hi, const QAct *a, int64_t n, float *out, int64_t stride,
                       int accumulate);

/* weights row i of m (and its Q8 scales), and a prefetch PF bytes ahead of it in the stream (0: none) */
#define ROW_WEIGHTS(i, PF)                                                                                   \
    const uint8_t *w = m->type == W_Q8 ? (const uint8_t *)m->w + (i) * n : (const uint8_t *)m->w + (i) * rb; \
    const float *ws = m->type == W_Q8 ? m->s + (i) * n_groups : NULL;                                        \
    if (PF)                                                                                                  \
        for (int64_t off = 0; off < rb; off += 64) __builtin_prefetch(w + off + (PF));                       \
    (void)ws;

/* the row loop around one dots call */
#define ROW_LOOP(DOTS)                                                                                       \
    int64_t rb = row_bytes(m, n), n_groups = n / a->gs;                                                      \
    for (int64_t i = lo; i < hi; i++) {                                                                      \
        ROW_WEIGHTS(i, a->prefetch)                                                                          \
        float res[8];                                                                                        \
        DOTS;                                                                                                \
        for (int t = 0; t < NT; t++) store(&out[t * stride + i], res[t], accumulate);                        \
    }

/* NAME_1 .. NAME_8 from DEFINE_NT(NAME, DOTS, nt), one per token count, and the table NAME[nt] of them */
#define DEFINE_NT_TABLE(DEFINE_NT, NAME, DOTS)                                                                 \
    DEFINE_NT(NAME, DOTS, 1) DEFINE_NT(NAME, DOTS, 2) DEFINE_NT(NAME, DOTS, 3) DEFINE_NT(NAME, DOTS, 4)        \
    DEFINE_NT(NAME, DOTS, 5) DEFINE_NT(NAME, DOTS, 6) DEFINE_NT(NAME, DOTS, 7) DEFINE_NT(NAME, DOTS, 8)        \
    static const RowsFn NAME[9] = {NULL, NAME##_1, NAME##_2, NAME##_3, NAME##_4, NAME##_5, NAME##_6, NAME##_7, \
                                   NAME##_8};

#define DEFINE_ROWS(NAME, DOTS) DEFINE_NT_TABLE(DEFINE_ROWS_NT, NAME, DOTS)
#define DEFINE_ROWS_NT(NAME, DOTS, nt)                                                                         \
    static __attribute__((noinline)) void NAME##_##nt(const Mat *m, int64_t lo, int64_t hi, const QAct *a,    \
                                                      int64_t n, float *out, int64_t stride, int accumulate) { \
        enum { NT = nt };                                                                                      \
        ROW_LOOP(DOTS)                                                                                         \
    }

#ifdef HAVE_ZMM_INT8
/* The AVX-512 int8 rows: DOTS leaves each token's 16 partial sums of a row in acc[t], summed in hsum16's tree.
 * One token's rows go sixteen at a time: their sums side by side (f32_sums16, the same tree, so the same result
 * as one row alone whatever the chunk's bounds) and one store for sixteen outputs: the horizontal sums of single
 * rows are a sizable share of a short row's time (docs/speed.md). */
#define ZMM_ROW(i, DOTS)                                                                                     \
    ROW_WEIGHTS(i, a->prefetch)                                                                              \
    __m512 acc[8];                                                                                           \
    DOTS;

#define DEFINE_ZMM_ROWS(NAME, DOTS) DEFINE_NT_TABLE(DEFINE_ZMM_ROWS_NT, NAME, DOTS)
#define DEFINE_ZMM_ROWS_NT(NAME, DOTS, nt)                                                                     \
    static __attribute__((noinline)) void NAME##_##nt(const Mat *m, int64_t lo, int64_t hi, const QAct *a,    \
                                                      int64_t n, float *out, int64_t stride, int accumulate) { \
        enum { NT = nt };                                                                                      \
        int64_t rb = row_bytes(m, n), n_groups = n / a->gs, i = lo;                                            \
        if (NT == 1)                                                                                           \
            for (; i + 16 <= hi; i += 16) {                                                                    \
                __m512 rows[16];                                                                               \
                for (int r = 0; r < 16; r++) {                                                                 \
                    ZMM_ROW(i + r, DOTS)                                                                       \
                    rows[r] = acc[0];                                                                          \
                }                                                                                              \
                __m512 sums = f32_sums16(rows);                                                                \
                if (accumulate) sums = _mm512_add_ps(_mm512_loadu_ps(out + i), sums);                          \
                _mm512_storeu_ps(out + i, sums);                                                               \
            }                                                                                                  \
        for (; i < hi; i++) {                                                                                  \
            ZMM_ROW(i, DOTS)                                                                                   \
            for (int t = 0; t < NT; t++) store(&out[t * stride + i], hsum16(acc[t]), accumulate);              \
        }                                                                                                      \
    }
#endif

static void dots_int8_scalar_nt(const uint8_t *w, const float *ws, int type, const QAct *a, int64_t n, int nt,
                                float *res) {
    dots_int8_scalar(w, ws, type, a, n, nt, res);
}
DEFINE_ROWS(rows_scalar, dots_int8_scalar_nt(w, ws, m->type, a, n, NT, res))
#ifdef __AVX2__
/* The AVX2 int8 rows: DOTS leaves a row's 8 partial sums for each token in acc[t], its dot being hsum8 of them.
 * One token's rows go eight at a time: their sums side by side (f32_sums8, hsum8's tree, so the same result as
 * one row alone whatever the chunk's bounds) and one store for the eight. The rows of a pass are read one after
 * another, each with its prefetches just before it: four rows read side by side (four chains of multiply-adds
 * instead of one), with the prefetches of all four first, read DRAM markedly slower (docs/speed.md). */
#define DEFINE_YMM_ROWS(NAME, DOTS) DEFINE_NT_TABLE(DEFINE_YMM_ROWS_NT, NAME, DOTS)
#define DEFINE_YMM_ROWS_NT(NAME, DOTS, nt)                                                                     \
    static __attribute__((noinline)) void NAME##_##nt(const Mat *m, int64_t lo, int64_t hi, const QAct *a,    \
                                                      int64_t n, float *out, int64_t stride, int accumulate) { \
        enum { NT = nt };                                                                                      \
        int64_t rb = row_bytes(m, n), n_groups = n / a->gs, i = lo;                                            \
        if (NT == 1)                                                                                           \
            for (; i + 8 <= hi; i += 8) {                                                                      \
                __m256 rows[8];                                                                                \
                for (int r = 0; r < 8; r++) {                                                                  \
                    ROW_WEIGHTS(i + r, a->prefetch)                                                            \
                    __m256 *acc = rows + r;                                                                    \
                    DOTS;                                                                                      \
                }                                                                                              \
                store8(out + i, f32_sums8(rows), accumulate);                                                  \
            }                                                                                                  \
        for (; i < hi; i++) {                                                                                  \
            ROW_WEIGHTS(i, a->prefetch)                                                                        \
            __m256 acc[8];                                                                                     \
            DOTS;                                                                                              \
            for (int t = 0; t < NT; t++) store(&out[t * stride + i], hsum8(acc[t]), accumulate);               \
        }                                                                                                      \
    }

DEFINE_YMM_ROWS(rows_q8_avx2, dots_int8_avx2(w, ws, W_Q8, a, n, NT, acc, 0))
DEFINE_YMM_ROWS(rows_q8_g64_avx2, dots_int8_avx2(w, ws, W_Q8, a, n, NT, acc, 64))
DEFINE_YMM_ROWS(rows_q8_g32_avx2, dots_int8_avx2(w, ws, W_Q8, a, n, NT, acc, 32))
DEFINE_YMM_ROWS(rows_q8_blocks_avx2, dots_int8_avx2(w, ws, W_Q8_0, a, n, NT, acc, BLOCK))
#endif
#ifdef HAVE_ZMM_INT8
DEFINE_ZMM_ROWS(rows_q4, dots_q4_simd(w, n / BLOCK, a, NT, acc))
DEFINE_ZMM_ROWS(rows_q4r_groups, dots_q4r_simd(w, a, n, NT, acc))

/* Q4_0R rows, sixteen at a time: their groups' lanes summed in hsum16's tree (f32_sums16 for one token), then
 * their last blocks' sums (q4r_lasts16, read after the groups, which bring their lines in) added. Rows with no
 * last blocks as rows_q4r_groups. */
#define DEFINE_ZMM_Q4R_LASTS_NT(NAME, DOTS, nt)                                                                \
    static __attribute__((noinline)) void NAME##_##nt(const Mat *m, int64_t lo, int64_t hi, const QAct *a,    \
                                                      int64_t n, float *out, int64_t stride, int accumulate) { \
        enum { NT = nt };                                                                                      \
        int64_t rb = row_bytes(m, n), n_groups = n / a->gs;                                                    \
        if (n / BLOCK % 4 == 0) {                                                                              \
            rows_q4r_groups[NT](m, lo, hi, a, n, out, stride, accumulate);                                     \
            return;                                                                                            \
        }                                                                                                      \
        for (int64_t i = lo; i < hi; i += 16) {                                                                \
            int count = hi - i < 16 ? (int)(hi - i) : 16, all = NT == 1 && count == 16;                        \
            __m512 rows[16], lasts[NT];                                                                        \
            float sums[NT][16], last[16];                                                                      \
            if (all)                                                                                           \
                for (int r = 0; r < 16; r++) {                                                                 \
                    ZMM_ROW(i + r, DOTS)                                                                       \
                    rows[r] = acc[0];                                                                          \
                }                                                                                              \
            else                                                                                               \
                for (int r = 0; r < count; r++) {                                                              \
                    ZMM_ROW(i + r, DOTS)                                                                       \
                    for (int t = 0; t < NT; t++) sums[t][r] = hsum16(acc[t]);                                  \
                }                                                                                              \
            q4r_lasts16((const uint8_t *)m->w + i * rb, rb, count, a, n, NT, lasts);                           \
            if (all) {                                                                                         \
                __m512 v = _mm512_add_ps(f32_sums16(rows), lasts[0]);                                          \
                if (accumulate) v = _mm512_add_ps(_mm512_loadu_ps(out + i), v);                                \
                _mm512_storeu_ps(out + i, v);                                                                  \
                continue;                                                                                      \
            }                                                                                                  \
            for (int t = 0; t < NT; t++) {                                                                     \
                _mm512_storeu_ps(last, lasts[t]);                                                              \
                for (int r = 0; r < count; r++)                                                                \
                    store(&out[t * stride + i + r], sums[t][r] + last[r], accumulate);                         \
            }                                                                                                  \
        }                                                                                                      \
    }
DEFINE_NT_TABLE(DEFINE_ZMM_Q4R_LASTS_NT, rows_q4r_alone, dots_q4r_simd(w, a, n, NT, acc))

/* Q4_0R rows of one group of 4 blocks go four at a time (dots_q4r_quad); other rows, and the last rows of a
 * count not a multiple of 4, as rows_q4r_alone */
#define DEFINE_ZMM_Q4R_ROWS_NT(NAME, DOTS, nt)                                                                 \
    static __attribute__((noinline)) void NAME##_##nt(const Mat *m, int64_t lo, int64_t hi, const QAct *a,    \
                                                      int64_t n, float *out, int64_t stride, int accumulate) { \
        enum { NT = nt };                                                                                      \
        int64_t rb = row_bytes(m, n), i = lo;                                                                  \
        if (n != 4 * BLOCK) {                                                                                  \
            rows_q4r_alone[NT](m, lo, hi, a, n, out, stride, accumulate);                                      \
            return;                                                                                            \
        }                                                                                                      \
        if (NT == 1)                                                                                           \
            for (; i + 16 <= hi; i += 16) {                                                                    \
                __m512 rows[16];                                                                               \
                for (int r = 0; r < 16; r += 4) {                                                              \
                    __m512 quad[4][8];                                                                         \
                    dots_q4r_quad((const uint8_t *)m->w + (i + r) * rb, rb, a, NT, quad);                      \
                    for (int k = 0; k < 4; k++) rows[r + k] = quad[k][0];                                      \
                }                                                                                              \
                __m512 sums = f32_sums16(rows);                                                                \
                if (accumulate) sums = _mm512_add_ps(_mm512_loadu_ps(out + i), sums);                          \
                _mm512_storeu_ps(out + i, sums);                                                               \
            }                                                                                                  \
        for (; i + 4 <= hi; i += 4) {                                                                          \
            __m512 quad[4][8];                                                                                 \
            dots_q4r_quad((const uint8_t *)m->w + i * rb, rb, a, NT, quad);                                    \
            for (int k = 0; k < 4; k++)                                                                        \
                for (int t = 0; t < NT; t++) store(&out[t * stride + i + k], hsum16(quad[k][t]), accumulate);  \
        }                                                                                                      \
        if (i < hi) rows_q4r_alone[NT](m, i, hi, a, n, out, stride, accumulate);                               \
    }
DEFINE_NT_TABLE(DEFINE_ZMM_Q4R_ROWS_NT, rows_q4r, _)
DEFINE_ZMM_ROWS(rows_q8r, dots_q8r_simd(w, 0, a, n, NT, acc))
DEFINE_ZMM_ROWS(rows_q8r_g32, dots_q8r_simd(w, 1, a, n, NT, acc))
DEFINE_ZMM_ROWS(rows_q8r_g64, dots_q8r_simd(w, 2, a, n, NT, acc))
DEFINE_ZMM_ROWS(rows_q8_blocks, dots_q8_blocks_simd(w, n / BLOCK, a, NT, acc))
DEFINE_ZMM_ROWS(rows_q8, dots_q8_simd(w, ws, a, n, NT, acc))
DEFINE_ZMM_ROWS(rows_q8_g64, dots_q8_g64_simd(w, ws, a, n, NT, acc))
DEFINE_ZMM_ROWS(rows_q8_g32, dots_q8_g32_simd(w, ws, a, n, NT, acc))
#elif defined(__AVX2__)
DEFINE_YMM_ROWS(rows_q4, dots_q4_simd(w, n / BLOCK, a, NT, acc))
DEFINE_YMM_ROWS(rows_q4r_groups, dots_q4r_simd(w, a, n, NT, acc))

/* Eight Q4_0R rows' results from their groups' sums (rows: one token's eight rows' lanes, all = NT == 1 and eight
 * rows; else sums: each row's hsum8 per token) and their last blocks' (lasts, where LASTS), as q4r_lasts8 says:
 * added after the groups' tree */
#define Q4R_STORE8(i, count, all, rows, sums, lasts, LASTS)                                                    \
    if (all) {                                                                                                 \
        __m256 v_ = f32_sums8(rows);                                                                           \
        store8(out + (i), LASTS ? _mm256_add_ps(v_, lasts[0]) : v_, accumulate);                               \
    } else                                                                                                     \
        for (int t = 0; t < NT; t++) {                                                                         \
            float last_[8];                                                                                    \
            _mm256_storeu_ps(last_, LASTS ? lasts[t] : _mm256_setzero_ps());                                   \
            for (int r = 0; r < (count); r++)                                                                  \
                store(&out[t * stride + (i) + r], LASTS ? sums[t][r] + last_[r] : sums[t][r], accumulate);     \
        }

/* Q4_0R rows with last blocks, eight at a time (rows without: rows_q4r_groups) */
#define DEFINE_YMM_Q4R_LASTS_NT(NAME, DOTS, nt)                                                                \
    static __attribute__((noinline)) void NAME##_##nt(const Mat *m, int64_t lo, int64_t hi, const QAct *a,    \
                                                      int64_t n, float *out, int64_t stride, int accumulate) { \
        enum { NT = nt };                                                                                      \
        int64_t rb = row_bytes(m, n), n_groups = n / a->gs;                                                    \
        if (n / BLOCK % 4 == 0) {                                                                              \
            rows_q4r_groups[NT](m, lo, hi, a, n, out, stride, accumulate);                                     \
            return;                                                                                            \
        }                                                                                                      \
        for (int64_t i = lo; i < hi; i += 8) {                                                                 \
            int count = hi - i < 8 ? (int)(hi - i) : 8, all = NT == 1 && count == 8;                           \
            __m256 rows[8], lasts[NT];                                                                         \
            float sums[NT][8];                                                                                 \
            if (all)                                                                                           \
                for (int r = 0; r < 8; r++) {                                                                  \
                    ROW_WEIGHTS(i + r, a->prefetch)                                                            \
                    __m256 *acc = rows + r;                                                                    \
                    DOTS;                                                                                      \
                }                                                                                              \
            else                                                                                               \
                for (int r = 0; r < count; r++) {                                                             \
                    ROW_WEIGHTS(i + r, a->prefetch)                                                            \
                    __m256 acc[8];                                                                             \
                    DOTS;                                                                                      \
                    for (int t = 0; t < NT; t++) sums[t][r] = hsum8(acc[t]);                                   \
                }                                                                                              \
            q4r_lasts8((const uint8_t *)m->w + i * rb, rb, count, a, n, NT, lasts);                            \
            Q4R_STORE8(i, count, all, rows, sums, lasts, 1)                                                    \
        }                                                                                                      \
    }
DEFINE_NT_TABLE(DEFINE_YMM_Q4R_LASTS_NT, rows_q4r_alone, dots_q4r_simd(w, a, n, NT, acc))

/* Q4_0R rows with a group of 4 (4-7 or 12-15 blocks past their groups of 16) go two at a time
 * (dots_q4r_pair), the last row of an odd count alone (the same numbers), eight rows' last blocks then at once
 * (q4r_lasts8); other rows as rows_q4r_alone */
#define Q4R_PAIR(i, acc_a, acc_b)                                                                             \
    {                                                                                                          \
        const uint8_t *wa = (const uint8_t *)m->w + (i) * rb;                                                  \
        if (a->prefetch)                                                                                       \
            for (int64_t off = 0; off < 2 * rb; off += 64) __builtin_prefetch(wa + off + a->prefetch);         \
        dots_q4r_pair(wa, wa + rb, a, n, NT, acc_a, acc_b);                                                    \
    }
#define DEFINE_Q4R_ROWS_NT(NAME, DOTS, nt)                                                                     \
    static __attribute__((noinline)) void NAME##_##nt(const Mat *m, int64_t lo, int64_t hi, const QAct *a,    \
                                                      int64_t n, float *out, int64_t stride, int accumulate) { \
        enum { NT = nt };                                                                                      \
        int64_t rb = row_bytes(m, n), n_groups = n / a->gs;                                                    \
        int has_lasts = n / BLOCK % 4 != 0;                                                                    \
        if (n / BLOCK % 8 < 4) { /* no group of 4 */                                                           \
            rows_q4r_alone[NT](m, lo, hi, a, n, out, stride, accumulate);                                      \
            return;                                                                                            \
        }                                                                                                      \
        for (int64_t i = lo; i < hi; i += 8) {                                                                 \
            int count = hi - i < 8 ? (int)(hi - i) : 8, all = NT == 1 && count == 8, r = 0;                    \
            __m256 rows[8], lasts[NT];                                                                         \
            float sums[NT][8];                                                                                 \
            if (all)                                                                                           \
                for (; r < 8; r += 2) Q4R_PAIR(i + r, rows + r, rows + r + 1)                                  \
            else {                                                                                             \
                for (; r + 2 <= count; r += 2) {                                                               \
                    __m256 acc_a[8], acc_b[8];                                                                 \
                    Q4R_PAIR(i + r, acc_a, acc_b)                                                              \
                    for (int t = 0; t < NT; t++)                                                               \
                        sums[t][r] = hsum8(acc_a[t]), sums[t][r + 1] = hsum8(acc_b[t]);                        \
                }                                                                                              \
                if (r < count) {                                                                               \
                    ROW_WEIGHTS(i + r, a->prefetch)                                                            \
                    __m256 acc[8];                                                                             \
                    dots_q4r_simd(w, a, n, NT, acc);                                                           \
                    for (int t = 0; t < NT; t++) sums[t][r] = hsum8(acc[t]);                                   \
                }                                                                                              \
            }                                                                                                  \
            if (has_lasts) q4r_lasts8((const uint8_t *)m->w + i * rb, rb, count, a, n, NT, lasts);             \
            Q4R_STORE8(i, count, all, rows, sums, lasts, has_lasts)                                            \
        }                                                                                                      \
    }
DEFINE_NT_TABLE(DEFINE_Q4R_ROWS_NT, rows_q4r, _)
DEFINE_YMM_ROWS(rows_q8r_alone, dots_q8r_simd(w, 0, a, n, NT, acc))
DEFINE_YMM_ROWS(rows_q8r_g32_alone, dots_q8r_simd(w, 1, a, n, NT, acc))
DEFINE_YMM_ROWS(rows_q8r_g64_alone, dots_q8r_simd(w, 2, a, n, NT, acc))

/* One token's Q8_0R or Q8R rows (per: as dots_q8r_simd) where q8_pairs is set: the chunk's first half and its
 * second read side by side, row lo + k beside row lo + h + k (dots_q8r_pair), so that a thread reads two streams
 * of weights instead of one; each row's result is what it gets alone (hsum8 is f32_sums8's tree), so a chunk's
 * bounds and the pairing change nothing. Each stream prefetches q8_pair_prefetch_bytes ahead (see q8_pairs).
 * Rows of fewer than 16 blocks (no group of 16 to take in turn), several tokens, and the last row of an odd
 * count go as rows_q8r_alone, eight rows to a store (15M's rows of 9 blocks in pairs, a store a row, ran 3-8%
 * slower). */
static void rows_q8r_pairs(const Mat *m, int per, int64_t lo, int64_t hi, const QAct *a, int64_t n, float *out,
                           int accumulate) {
    int64_t rb = row_bytes(m, n), h = (hi - lo) / 2;
    for (int64_t k = 0; k < h; k++) {
        const uint8_t *wa = (const uint8_t *)m->w + (lo + k) * rb, *wb = wa + h * rb;
        for (int64_t off = 0; q8_pair_prefetch_bytes && off < rb; off += 64) {
            __builtin_prefetch(wa + off + q8_pair_prefetch_bytes);
            __builtin_prefetch(wb + off + q8_pair_prefetch_bytes);
        }
        __m256 acc_a[1], acc_b[1];
        dots_q8r_pair(wa, wb, per, a, n, acc_a, acc_b);
        store(&out[lo + k], hsum8(acc_a[0]), accumulate);
        store(&out[lo + h + k], hsum8(acc_b[0]), accumulate);
    }
}

/* NAME's table: NAME##_1 (pairs where they apply), rows_*_alone's functions for several tokens, named (entries
 * of another table are no compile-time constants in C: clang refuses them) */
#define DEFINE_Q8R_PAIRS(NAME, PER)                                                                            \
    static void NAME##_1(const Mat *m, int64_t lo, int64_t hi, const QAct *a, int64_t n, float *out,         \
                         int64_t stride, int accumulate) {                                                     \
        if (q8_pairs && n >= 16 * BLOCK && hi - lo >= 2) {                                                    \
            rows_q8r_pairs(m, PER, lo, hi, a, n, out, accumulate);                                             \
            lo += (hi - lo) / 2 * 2;                                                                           \
        }                                                                                                      \
        if (lo < hi) NAME##_alone[1](m, lo, hi, a, n, out, stride, accumulate);                                \
    }                                                                                                          \
    static const RowsFn NAME[9] = {NULL,           NAME##_1,       NAME##_alone_2, NAME##_alone_3,            \
                                   NAME##_alone_4, NAME##_alone_5, NAME##_alone_6, NAME##_alone_7,             \
                                   NAME##_alone_8};
DEFINE_Q8R_PAIRS(rows_q8r, 0)
DEFINE_Q8R_PAIRS(rows_q8r_g32, 1)
DEFINE_Q8R_PAIRS(rows_q8r_g64, 2)
#endif

/* the row kernels for m's type and group size */
static const RowsFn *rows_kernels(const Mat *m) {
#ifdef HAVE_ZMM_INT8
    if (m->type == W_Q8_0) return rows_q8_blocks;
    if (m->type == W_Q8 && m->gs == 64) return rows_q8_g64;
    if (m->type == W_Q8 && m->gs == 32) return rows_q8_g32;
    if (m->type == W_Q8 && m->gs % 64 == 0) return rows_q8;
#endif
#ifdef __AVX2__
    if (m->type == W_Q4_0) return rows_q4;
    if (m->type == W_Q4_0R) return rows_q4r;
    if (m->type == W_Q8_0R) return rows_q8r;
    if (m->type == W_Q8R) return m->gs == 64 ? rows_q8r_g64 : rows_q8r_g32; /* (regroup_q8 takes no other) */
    if (m->type == W_Q8_0) return rows_q8_blocks_avx2;
    if (m->gs == 64) return rows_q8_g64_avx2;
    if (m->gs == 32) return rows_q8_g32_avx2;
    if (m->gs % 32 == 0) return rows_q8_avx2;
#endif
    (void)m;
    return rows_scalar;
}

#ifdef HAVE_AMX
/* Products of many tokens (a prompt's) on Q8_0R, Q8R and Q4_0R rows by AMX's int8 tiles, with every output the
 * number the AVX-512 rows give it, bit for bit: a prompt's rows still equal decoding each token alone. The rows'
 * sums are integers, and a tile's TDPBSSD gives each block's exact int32 sum for 16 rows x 16 tokens at once (the
 * same integer as the kernels' vpdpbusd lanes, which start from a correction for their unsigned weights; Q4_0's
 * values as q - 8). The floating-point part is then the rows' own: dots_q8r_simd and dots_q4r_simd multiply block
 * b's int32 sum, converted, by d_w * d_x into lane b % 16 of an accumulator (the groups of 16 in order), the
 * tail's groups of 8 and 4 into lanes 0-7 of a second one and (Q8) its last blocks as eight 4-value sums each,
 * add the two and sum the 16 lanes in hsum16's tree; Q4_0R's last blocks, whole, go into a third accumulator
 * added after the tree (q4r_lasts16). Here the same multiply-adds run for 16 rows x 16 tokens at a time, one
 * accumulator a lane (each lane's blocks taken in their order), and hsum16's tree adds the 16 accumulators. A row's weights are first copied out
 * of their regrouped order into A tiles (a block's 32 values a row), a band of 16 rows at a time; the activations
 * are laid out as B tiles once per product (amx_lay_out). */
/* Fewer tokens go to the AVX-512 rows, as fast there (the same numbers either way): the tiles' fixed costs (a
 * band's copy into A tiles, its accumulators) pay from 32 tokens (docs/speed.md) */
#define AMX_MIN_TOKENS 32
#define AMX_ROWS 16       /* weight rows of a band: a tile's rows */

static int amx_on; /* whether products use the tiles: the OS granted them, and kernel_amx did not turn them off */

/* Linux gives a process AMX's tile state only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM for
 * XFEATURE_XTILEDATA); a kernel or hypervisor that does not grant it leaves the AVX-512 rows */
enum { AMX_REQ_XCOMP_PERM = 0x1023, AMX_XFEATURE_XTILEDATA = 18 }; /* linux/arch/x86/include/uapi/asm/prctl.h */
static int amx_granted(void) { return syscall(SYS_arch_prctl, AMX_REQ_XCOMP_PERM, AMX_XFEATURE_XTILEDATA) == 0; }

__attribute__((constructor)) static void amx_ask(void) { amx_on = amx_granted(); }

/* The tiles' shapes (palette 1), loaded by each thread before it runs them. Static: a configuration built on
 * the stack can be dropped by the compiler, which does not see LDTILECFG read it. */
static const struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) AMX_TILES = {
    1, 0, {0},
    /* C tiles (0, 3, 4, 5): 16 rows x 16 tokens' int32 sums; A tiles (1, 6): 16 rows x a block's 32 values; B
     * tiles (2, 7): a block's values of 16 tokens, 4 of each token a tile row */
    {64, 32, 64, 64, 64, 64, 32, 64},
    {16, 16, 8, 16, 16, 16, 16, 8},
};

/* Whether products of AMX_MIN_TOKENS tokens or more use the tiles: `want` 1 or 0 sets it (1 only where the OS
 * grants them), -1 only asks. For measurements and the tests that compare the two paths. */
int kernel_amx(int want) {
    if (want >= 0) amx_on = want && amx_granted();
    return amx_on;
}

static inline int amx_takes(const Mat *m, int64_t n_tok) {
    return amx_on && n_tok >= AMX_MIN_TOKENS && (m->type == W_Q8_0R || m->type == W_Q8R || m->type == W_Q4_0R);
}

/* The activations as B tiles: for tokens 16k..16k+15 and block b, 8 tile rows of 64 bytes at
 * xb + (k * nb + b) * 512, row v holding values 4v..4v+3 of each token's block b (token t at bytes 4t..4t+3),
 * and the 16 tokens' scales of the block (their group's, for groups of 64) at xdb + (k * nb + b) * 16; tokens
 * past n_tok are zeros. As lay_out_activations: `alloc` makes the buffers, tokens [t0, t1) are laid out. */
static void amx_lay_out(QAct *a, int64_t n_tok, int64_t n, int alloc, int64_t t0, int64_t t1) {
    int64_t nb = n / BLOCK, tiles = (n_tok + 15) / 16, n_groups = n / a->gs;
    if (alloc) {
        a->xb = scratch_alloc(tiles * nb * 512, 1);
        a->xdb = scratch_alloc(tiles * nb * 16 * sizeof(float), 1);
    }
    for (int64_t t = t0; t < t1; t++) {
        int64_t k = t / 16, c = t % 16;
        for (int64_t b = 0; b < nb; b++) {
            int8_t *tile = a->xb + (k * nb + b) * 512;
            for (int v = 0; v < 8; v++) memcpy(tile + 64 * v + 4 * c, a->q + t * n + b * BLOCK + 4 * v, 4);
            a->xdb[(k * nb + b) * 16 + c] = a->d[t * n_groups + b * BLOCK / a->gs];
        }
    }
}

/* the weight scale of block l of the group of G at g, after the group's `bytes` bytes a block of values or nibbles
 * (per: see rg_scale_bytes; groups of 64: the group's) */
static inline float amx_group_scale(const uint8_t *g, int64_t G, int64_t l, int per, int bytes) {
    const uint8_t *scales = g + bytes * G;
    return per == 0 ? fp16_to_f32(load_u16(scales + 2 * l)) : load_f32(scales + 4 * (per == 1 ? l : l / 2));
}

/* a group of 16 blocks' values (8 vectors of 16 4-byte lanes at g) as 16 A-tile rows of 32 bytes, block l's at
 * dst + 512 l: the 8 x 16 words transposed */
static inline void amx_group16(const uint8_t *g, int8_t *dst) {
    __m512i v[8], h[8], c[8];
    for (int j = 0; j < 8; j++) v[j] = _mm512_loadu_si512(g + 64 * j);
    for (int j = 0; j < 8; j += 2) { /* per 128-bit lane q: blocks 4q, 4q+1 (lo) and 4q+2, 4q+3 (hi), words j, j+1 */
        h[j] = _mm512_unpacklo_epi32(v[j], v[j + 1]);
        h[j + 1] = _mm512_unpackhi_epi32(v[j], v[j + 1]);
    }
    for (int half = 0; half < 2; half++) { /* c[4 half + m]: block 4q + m's words 4 half .. 4 half + 3 in lane q */
        const __m512i *p = h + 4 * half;
        c[4 * half + 0] = _mm512_unpacklo_epi64(p[0], p[2]);
        c[4 * half + 1] = _mm512_unpackhi_epi64(p[0], p[2]);
        c[4 * half + 2] = _mm512_unpacklo_epi64(p[1], p[3]);
        c[4 * half + 3] = _mm512_unpackhi_epi64(p[1], p[3]);
    }
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), last = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int m = 0; m < 4; m++) {
        __m512i lo = _mm512_permutex2var_epi64(c[m], first, c[4 + m]); /* blocks m, 4 + m */
        __m512i hi = _mm512_permutex2var_epi64(c[m], last, c[4 + m]);  /* blocks 8 + m, 12 + m */
        _mm256_storeu_si256((__m256i *)(dst + 512 * m), _mm512_castsi512_si256(lo));
        _mm256_storeu_si256((__m256i *)(dst + 512 * (4 + m)), _mm512_extracti64x4_epi64(lo, 1));
        _mm256_storeu_si256((__m256i *)(dst + 512 * (8 + m)), _mm512_castsi512_si256(hi));
        _mm256_storeu_si256((__m256i *)(dst + 512 * (12 + m)), _mm512_extracti64x4_epi64(hi, 1));
    }
}

/* a group of 8 blocks' values (8 vectors of 8 4-byte lanes at g) as 8 A-tile rows, block l's at dst + 512 l:
 * amx_group16's transpose in 256-bit registers */
static inline void amx_group8(const uint8_t *g, int8_t *dst) {
    __m256i v[8], h[8], c[8];
    for (int j = 0; j < 8; j++) v[j] = _mm256_loadu_si256((const __m256i *)(g + 32 * j));
    for (int j = 0; j < 8; j += 2) {
        h[j] = _mm256_unpacklo_epi32(v[j], v[j + 1]);
        h[j + 1] = _mm256_unpackhi_epi32(v[j], v[j + 1]);
    }
    for (int half = 0; half < 2; half++) { /* c[4 half + m]: block 4q + m's words 4 half .. 4 half + 3 in lane q */
        const __m256i *p = h + 4 * half;
        c[4 * half + 0] = _mm256_unpacklo_epi64(p[0], p[2]);
        c[4 * half + 1] = _mm256_unpackhi_epi64(p[0], p[2]);
        c[4 * half + 2] = _mm256_unpacklo_epi64(p[1], p[3]);
        c[4 * half + 3] = _mm256_unpackhi_epi64(p[1], p[3]);
    }
    for (int m = 0; m < 4; m++) {
        _mm256_storeu_si256((__m256i *)(dst + 512 * m), _mm256_permute2x128_si256(c[m], c[4 + m], 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 512 * (4 + m)), _mm256_permute2x128_si256(c[m], c[4 + m], 0x31));
    }
}

/* a Q4_0R group of 8 blocks' nibbles (4 vectors of 8 4-byte lanes at g) as 8 A-tile rows of 32 values q - 8 */
static inline void amx_group8_q4(const uint8_t *g, int8_t *dst) {
    __m256i v[4], h[4], c[4];
    for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_si256((const __m256i *)(g + 32 * j));
    h[0] = _mm256_unpacklo_epi32(v[0], v[1]), h[1] = _mm256_unpackhi_epi32(v[0], v[1]);
    h[2] = _mm256_unpacklo_epi32(v[2], v[3]), h[3] = _mm256_unpackhi_epi32(v[2], v[3]);
    c[0] = _mm256_unpacklo_epi64(h[0], h[2]), c[1] = _mm256_unpackhi_epi64(h[0], h[2]); /* block 4q + m's 16 bytes */
    c[2] = _mm256_unpacklo_epi64(h[1], h[3]), c[3] = _mm256_unpackhi_epi64(h[1], h[3]); /* in lane q of c[m] */
    const __m256i low = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
    for (int m = 0; m < 4; m++) {
        __m256i lo = _mm256_sub_epi8(_mm256_and_si256(c[m], low), eight);
        __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(c[m], 4), low), eight);
        _mm256_storeu_si256((__m256i *)(dst + 512 * m), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 512 * (4 + m)), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
}

/* a Q4_0R group of 16 blocks' nibbles (4 vectors of 16 4-byte lanes at g) as 16 A-tile rows of 32 values
 * (q - 8: low nibbles values 0-15, high ones 16-31), block l's at dst + 512 l */
static inline void amx_group16_q4(const uint8_t *g, int8_t *dst) {
    __m512i v[4], h[4], c[4];
    for (int j = 0; j < 4; j++) v[j] = _mm512_loadu_si512(g + 64 * j);
    h[0] = _mm512_unpacklo_epi32(v[0], v[1]), h[1] = _mm512_unpackhi_epi32(v[0], v[1]);
    h[2] = _mm512_unpacklo_epi32(v[2], v[3]), h[3] = _mm512_unpackhi_epi32(v[2], v[3]);
    c[0] = _mm512_unpacklo_epi64(h[0], h[2]), c[1] = _mm512_unpackhi_epi64(h[0], h[2]); /* block 4q + m's 16 bytes */
    c[2] = _mm512_unpacklo_epi64(h[1], h[3]), c[3] = _mm512_unpackhi_epi64(h[1], h[3]); /* in lane q of c[m] */
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), last = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    for (int m = 0; m < 4; m++) {
        __m512i lo = _mm512_sub_epi8(_mm512_and_si512(c[m], low), eight);
        __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(c[m], 4), low), eight);
        __m512i a = _mm512_permutex2var_epi64(lo, first, hi), b = _mm512_permutex2var_epi64(lo, last, hi);
        _mm256_storeu_si256((__m256i *)(dst + 512 * m), _mm512_castsi512_si256(a));
        _mm256_storeu_si256((__m256i *)(dst + 512 * (4 + m)), _mm512_extracti64x4_epi64(a, 1));
        _mm256_storeu_si256((__m256i *)(dst + 512 * (8 + m)), _mm512_castsi512_si256(b));
        _mm256_storeu_si256((__m256i *)(dst + 512 * (12 + m)), _mm512_extracti64x4_epi64(b, 1));
    }
}

/* a Q4_0 block's 16 bytes of nibbles as its 32 values q - 8 */
static inline void amx_unpack_q4(const uint8_t *nibbles, int8_t *dst) {
    for (int i = 0; i < 16; i++) dst[i] = (int8_t)((nibbles[i] & 15) - 8), dst[16 + i] = (int8_t)((nibbles[i] >> 4) - 8);
}

/* a Q4_0R row (its regrouped bytes at row) as the band's A tiles, as amx_band_row */
static void amx_band_row_q4(const uint8_t *row, int64_t n, int r, int8_t *ab, float *wdb) {
    int64_t nb = n / BLOCK;
    for (int64_t b0 = 0, G; b0 < nb; b0 += G) {
        G = rg_group(nb - b0);
        const uint8_t *g = row + b0 * 18;
        if (G == 1) {
            amx_unpack_q4(g + 2, ab + (16 * b0 + r) * BLOCK);
            wdb[16 * b0 + r] = fp16_to_f32(load_u16(g));
            continue;
        }
        if (G == 16) amx_group16_q4(g, ab + (16 * b0 + r) * BLOCK);
        else if (G == 8) amx_group8_q4(g, ab + (16 * b0 + r) * BLOCK);
        else
            for (int64_t l = 0; l < G; l++) {
                uint8_t nibbles[16];
                rg_gather(g, G, l, 4, nibbles);
                amx_unpack_q4(nibbles, ab + (16 * (b0 + l) + r) * BLOCK);
            }
        for (int64_t l = 0; l < G; l++) wdb[16 * (b0 + l) + r] = amx_group_scale(g, G, l, 0, BLOCK / 2);
    }
}

/* Row r of a band (its regrouped bytes at row) as the band's A tiles: block b's 32 values at
 * ab + (16 b + r) * 32, its weight scale at wdb[16 b + r] */
static void amx_band_row(const uint8_t *row, int64_t n, int per, int r, int8_t *ab, float *wdb) {
    int64_t nb = n / BLOCK;
    for (int64_t b0 = 0, G; b0 < nb; b0 += G) {
        G = rg_group(nb - b0);
        const uint8_t *g = row + b0 * rg_block_bytes(per);
        if (G == 1) {
            const uint8_t *values, *scale;
            rg_single(row, per, b0, &values, &scale);
            memcpy(ab + (16 * b0 + r) * BLOCK, values, BLOCK);
            wdb[16 * b0 + r] = per ? load_f32(scale) : fp16_to_f32(load_u16(scale));
            continue;
        }
        if (G == 16) amx_group16(g, ab + (16 * b0 + r) * BLOCK);
        else if (G == 8) amx_group8(g, ab + (16 * b0 + r) * BLOCK);
        else
            for (int64_t l = 0; l < G; l++) rg_gather(g, G, l, BLOCK / 4, (uint8_t *)ab + (16 * (b0 + l) + r) * BLOCK);
        for (int64_t l = 0; l < G; l++) wdb[16 * (b0 + l) + r] = amx_group_scale(g, G, l, per, BLOCK);
    }
}

/* One TDPBSSD's worth of a band's work: an A tile (16 rows x 32 values) against a B tile (16 tokens), the int32
 * sums then multiplied by d_w (wd: the 16 rows') x d_x (xd: the 16 tokens') and added into acc (16 rows x 16
 * tokens), or written there where `first` (the rows' first multiply-add into an accumulator starts from zero). */
typedef struct {
    const int8_t *a, *b;
    const float *wd, *xd;
    float *acc;
    int first;
} AmxItem;

/* acc[r] (16 tokens) = cvt(sums of row r) * d_w * d_x + acc[r] (+ 0 where first), from the C tile stored at c */
ALWAYS_INLINE void amx_scale(int32_t *c, const AmxItem *it) {
    __m512 x = _mm512_loadu_ps(it->xd);
    float *acc = it->acc;
    UNROLL16
    for (int r = 0; r < 16; r++) {
        __m512 before = it->first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + 16 * r);
        _mm512_storeu_ps(acc + 16 * r, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + 16 * r)),
                                                       _mm512_mul_ps(_mm512_set1_ps(it->wd[r]), x), before));
    }
}

/* Work items in order, four in the tiles at once: item i + 3's products are issued (A_AT(i), B_AT(i): its A and
 * B tiles' addresses; C tiles 0, 3, 4, 5, A tiles 1, 6, B tiles 2, 7), item i's sums stored, and item i - 1's
 * (stored one step before) scaled by SCALE(c, i - 1), c its sums, so that the tiles' latencies overlap each
 * other and the scaling. Items that add into the same accumulator are scaled in list order. */
#define AMX_ISSUE(C, A, B, i, A_AT, B_AT)                                                                      \
    do {                                                                                                       \
        _tile_zero(C);                                                                                         \
        _tile_loadd(A, A_AT(i), BLOCK);                                                                        \
        _tile_loadd(B, B_AT(i), 64);                                                                           \
        _tile_dpbssd(C, A, B);                                                                                 \
    } while (0)
#define AMX_ISSUE_AT(i, A_AT, B_AT)                                                                            \
    do {                                                                                                       \
        switch ((i) & 3) {                                                                                     \
        case 0: AMX_ISSUE(0, 1, 2, i, A_AT, B_AT); break;                                                       \
        case 1: AMX_ISSUE(3, 6, 7, i, A_AT, B_AT); break;                                                       \
        case 2: AMX_ISSUE(4, 1, 2, i, A_AT, B_AT); break;                                                       \
        default: AMX_ISSUE(5, 6, 7, i, A_AT, B_AT); break;                                                      \
        }                                                                                                      \
    } while (0)
#define AMX_PIPELINE(n_items, A_AT, B_AT, SCALE)                                                               \
    do {                                                                                                       \
        int32_t c[4][256] __attribute__((aligned(64)));                                                        \
        for (int64_t i = 0; i < 3 && i < (n_items); i++) AMX_ISSUE_AT(i, A_AT, B_AT);                          \
        for (int64_t i = 0; i < (n_items); i++) {                                                              \
            if (i + 3 < (n_items)) AMX_ISSUE_AT(i + 3, A_AT, B_AT);                                            \
            switch (i & 3) {                                                                                   \
            case 0: _tile_stored(0, c[0], 64); break;                                                          \
            case 1: _tile_stored(3, c[1], 64); break;                                                          \
            case 2: _tile_stored(4, c[2], 64); break;                                                          \
            default: _tile_stored(5, c[3], 64); break;                                                         \
            }                                                                                                  \
            if (i > 0) SCALE(c[(i - 1) & 3], i - 1);                                                           \
        }                                                                                                      \
        if ((n_items) > 0) SCALE(c[((n_items) - 1) & 3], (n_items) - 1);                                       \
    } while (0)

/* a list of items (amx_items), each scaled by amx_scale */
static void amx_run(const AmxItem *items, int64_t n_items) {
#define ITEM_A(i) items[i].a
#define ITEM_B(i) items[i].b
#define ITEM_SCALE(c, i) amx_scale(c, items + (i))
    AMX_PIPELINE(n_items, ITEM_A, ITEM_B, ITEM_SCALE);
#undef ITEM_A
#undef ITEM_B
#undef ITEM_SCALE
}

/* A band's groups of 16 against token tile k (B tiles xb, scales xd) lane by lane, where a row has two groups or
 * more: lane l's blocks l, l + 16, l + 32, ... in that order (amx_run's order within a lane; the lanes are
 * independent), its 16 rows x 16 tokens accumulated in registers and stored once at lanes + 256 l: amx_scale's
 * multiply-adds without reading and writing the accumulator at every block. */
static void amx_run_lanes(const int8_t *ab, const int8_t *xb, const float *wdb, const float *xd, int64_t groups,
                          float *lanes) {
    __m512 acc[16];
    UNROLL16
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps(); /* (each lane's first block starts from zero) */
#define LANE_BLOCK(i) (16 * ((i) % groups) + (i) / groups)
#define LANE_A(i) (ab + 512 * LANE_BLOCK(i))
#define LANE_B(i) (xb + 512 * LANE_BLOCK(i))
#define LANE_SCALE(c, i)                                                                                       \
    do {                                                                                                       \
        int64_t b_ = LANE_BLOCK(i), g_ = (i) % groups;                                                         \
        __m512 x_ = _mm512_loadu_ps(xd + 16 * b_);                                                             \
        UNROLL16                                                                                               \
        for (int r = 0; r < 16; r++)                                                                           \
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((c) + 16 * r)),                      \
                                     _mm512_mul_ps(_mm512_set1_ps(wdb[16 * b_ + r]), x_),                       \
                                     g_ == 0 ? _mm512_setzero_ps() : acc[r]);                                  \
        if (g_ == groups - 1) {                                                                                \
            UNROLL16                                                                                           \
            for (int r = 0; r < 16; r++) _mm512_storeu_ps(lanes + 256 * ((i) / groups) + 16 * r, acc[r]);       \
        }                                                                                                      \
    } while (0)
    AMX_PIPELINE(16 * groups, LANE_A, LANE_B, LANE_SCALE);
#undef LANE_BLOCK
#undef LANE_A
#undef LANE_B
#undef LANE_SCALE
}

/* The items of a band (A tiles ab, scales wdb, a Q8 last block's A tiles masked to 4 values at singles) against
 * token tile k, into the accumulators the AVX-512 rows keep: lane l of the groups of 16 at lanes + 256 l (block
 * b into lane b % 16, in block order; none where lanes_done, amx_run_lanes having filled them), lanes 0-7 of the
 * tail's at tail + 256 l (its group of 8, then of 4, then (Q8) each last block's values 4j..4j+3 into lane j),
 * and (Q4_0) the last blocks' whole sums at lasts (q4r_lasts16). Returns the item count. */
static int64_t amx_items(const int8_t *ab, const int8_t *singles, const float *wdb, const QAct *a, int64_t k,
                         int64_t nb, int q4, int lanes_done, float *lanes, float *tail, float *lasts,
                         AmxItem *items) {
    const int8_t *xb = a->xb + k * nb * 512;
    const float *xd = a->xdb + k * nb * 16;
    int64_t n = 0, full = nb / 16 * 16, b = lanes_done ? full : 0;
    int started[8] = {0};
    for (; b < full; b++)
        items[n++] = (AmxItem){ab + 512 * b, xb + 512 * b, wdb + 16 * b, xd + 16 * b, lanes + 256 * (b % 16),
                               b < 16};
    for (int G = 8; G >= 4; G /= 2)
        if (nb - b >= G)
            for (int l = 0; l < G; l++, b++) {
                items[n++] = (AmxItem){ab + 512 * b, xb + 512 * b, wdb + 16 * b, xd + 16 * b, tail + 256 * l,
                                       !started[l]};
                started[l] = 1;
            }
    for (int64_t s = 0; b < nb; b++, s++)
        if (q4)
            items[n++] = (AmxItem){ab + 512 * b, xb + 512 * b, wdb + 16 * b, xd + 16 * b, lasts, s == 0};
        else
            for (int j = 0; j < 8; j++) {
                items[n++] = (AmxItem){singles + (8 * s + j) * 512, xb + 512 * b, wdb + 16 * b, xd + 16 * b,
                                       tail + 256 * j, !started[j]};
                started[j] = 1;
            }
    for (int l = 0; l < 8; l++) /* a tail lane no block reached stays zero, as the rows' does */
        if (!started[l]) memset(tail + 256 * l, 0, 256 * sizeof(float));
    return n;
}

/* row r's dots with the token tile's 16 tokens from the accumulators (lanes: zero where the row has no group of
 * 16), as the rows finish them: the tail's lanes 0-7 added to the lanes', then hsum16's tree, then (where not
 * NULL) the last blocks' sums */
ALWAYS_INLINE __m512 amx_row_sums(const float *lanes, const float *tail, const float *lasts, int64_t nb, int r) {
    __m512 v[16];
    for (int l = 0; l < 16; l++)
        v[l] = _mm512_add_ps(nb >= 16 ? _mm512_loadu_ps(lanes + 256 * l + 16 * r) : _mm512_setzero_ps(),
                             l < 8 ? _mm512_loadu_ps(tail + 256 * l + 16 * r) : _mm512_setzero_ps());
    for (int j = 0; j < 8; j++) v[j] = _mm512_add_ps(v[j], v[j + 8]);
    for (int j = 0; j < 4; j++) v[j] = _mm512_add_ps(v[j], v[j + 4]);
    __m512 sum = _mm512_add_ps(_mm512_add_ps(v[0], v[2]), _mm512_add_ps(v[1], v[3]));
    return lasts ? _mm512_add_ps(sum, _mm512_loadu_ps(lasts + 16 * r)) : sum;
}

/* A thread's memory for its bands (A tiles, scales, lanes' accumulators), kept from call to call: taken from
 * malloc per call, a prompt's hundreds of chunks each mapped fresh pages and unmapped them again (a TLB
 * shootdown on every CPU of the process), which made two threads slower than one. */
static pthread_key_t amx_key;
static __thread char *amx_memory;
static __thread int64_t amx_capacity;

static void make_amx_key(void) { pthread_key_create(&amx_key, free); }

static char *amx_buffer(int64_t bytes) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    if (bytes > amx_capacity) {
        pthread_once(&once, make_amx_key);
        free(amx_memory);
        amx_capacity = 0;
        amx_memory = aligned_alloc(64, (bytes + 63) / 64 * 64);
        pthread_setspecific(amx_key, amx_memory); /* freed when the thread ends */
        if (amx_memory == NULL) return NULL;
        amx_capacity = bytes;
    }
    return amx_memory;
}

/* Rows [lo, lo + 16 k) of m (a Q8_0R, Q8R or Q4_0R matrix) for every token by the tiles, the largest k that fits in
 * [lo, hi); returns the first row left to the AVX-512 rows (all of them where no memory is left). */
static int64_t amx_rows(const Mat *m, int64_t lo, int64_t hi, const QAct *a, int64_t n_tok, int64_t n,
                        float *out, int accumulate) {
    int64_t nb = n / BLOCK, rb = row_bytes(m, n), bands = (hi - lo) / AMX_ROWS, tiles = (n_tok + 15) / 16;
    int64_t n_singles = nb % 4, first_single = nb - n_singles; /* a row's last 0-3 blocks, left alone */
    int per = m->type == W_Q8R ? (m->gs == 32 ? 1 : 2) : 0, q4 = m->type == W_Q4_0R;
    int64_t a_bytes = nb * 512, s_bytes = q4 ? 0 : n_singles * 8 * 512, wd_bytes = nb * 16 * (int64_t)sizeof(float);
    int64_t acc_bytes = 25 * 256 * (int64_t)sizeof(float), item_bytes = (nb + 24) * (int64_t)sizeof(AmxItem);
    char *memory = bands ? amx_buffer(a_bytes + s_bytes + wd_bytes + acc_bytes + item_bytes) : NULL;
    if (memory == NULL) return lo;
    int8_t *ab = (int8_t *)memory, *singles = (int8_t *)(memory + a_bytes);
    float *wdb = (float *)(memory + a_bytes + s_bytes), *lanes = wdb + nb * 16, *tail = lanes + 16 * 256;
    float *lasts = q4 && n_singles ? tail + 8 * 256 : NULL;
    AmxItem *items = (AmxItem *)(tail + 9 * 256);
    int lanes_done = nb >= 32; /* the groups of 16 by amx_run_lanes: a lane with one block has nothing to carry */
    _tile_loadconfig(&AMX_TILES);
    for (int64_t i = lo; i < lo + bands * AMX_ROWS; i += AMX_ROWS) {
        for (int r = 0; r < 16; r++) {
            const uint8_t *row = (const uint8_t *)m->w + (i + r) * rb;
            if (q4) amx_band_row_q4(row, n, r, ab, wdb);
            else amx_band_row(row, n, per, r, ab, wdb);
        }
        /* a Q8 last block's values 4j..4j+3 of each row, the rest zeros: the rows' 4-value sums */
        memset(singles, 0, s_bytes);
        for (int64_t s = 0; s < n_singles && !q4; s++)
            for (int j = 0; j < 8; j++)
                for (int r = 0; r < 16; r++)
                    for (int v = 0; v < 4; v++)
                        singles[(8 * s + j) * 512 + 32 * r + 4 * j + v] =
                            ab[512 * (first_single + s) + 32 * r + 4 * j + v];
        for (int64_t k = 0; k < tiles; k++) {
            if (lanes_done) amx_run_lanes(ab, a->xb + k * nb * 512, wdb, a->xdb + k * nb * 16, nb / 16, lanes);
            amx_run(items, amx_items(ab, singles, wdb, a, k, nb, q4, lanes_done, lanes, tail, lasts, items));
            float s[16][16];
            for (int r = 0; r < 16; r++) _mm512_storeu_ps(s[r], amx_row_sums(lanes, tail, lasts, nb, r));
            for (int64_t t = 16 * k; t < 16 * k + 16 && t < n_tok; t++)
                for (int r = 0; r < 16; r++) store(&out[n_tok * m->row0 + t * m->rows + i + r], s[r][t - 16 * k], accumulate);
        }
    }
    _tile_release();
    return lo + bands * AMX_ROWS;
}
#else
int kernel_amx(int want) { (void)want; return 0; }
#endif

/* rows [lo, hi) of a quantized m for every token, 8 tokens a pass over the rows (prompts: AMX's tiles where
 * they take them, amx_rows) */
static void rows_int8(const Mat *m, int64_t lo, int64_t hi, const QAct *a, int64_t n_tok, int64_t n, float *out,
                      int accumulate) {
#ifdef HAVE_AMX
    if (amx_takes(m, n_tok) && a->xb) lo = amx_rows(m, lo, hi, a, n_tok, n, out, accumulate);
    if (lo >= hi) return;
#endif
    const RowsFn *kernels = rows_kernels(m);
    int64_t n_groups = n / a->gs;
    for (int64_t t0 = 0; t0 < n_tok; t0 += 8) {
        int nt = n_tok - t0 < 8 ? (int)(n_tok - t0) : 8;
        QAct at = *a;
        at.q += t0 * n;
        at.d += t0 * n_groups;
        if (at.q4) at.q4 += t0 * a->q4_stride, at.c4 += t0 * a->c4_stride, at.d4 += t0 * a->d4_stride;
        if (at.c8) at.c8 += t0 * a->c8_stride;
        if (at.d8) at.d8 += t0 * a->d8_stride;
        if (at.c32) at.c32 += t0 * a->c32_stride, at.d32 += t0 * a->d32_stride;
        if (at.q16) at.q16 += t0 * n, at.c16 += t0 * (n / BLOCK);
        kernels[nt](m, lo, hi, &at, n, out + n_tok * m->row0 + t0 * m->rows, m->rows, accumulate);
    }
}

/* The activation layouts the SIMD kernels of `types` (a bit per W_* type) read, from a->q and a->d, of a
 * product of n_tok tokens: where `alloc`, their buffers and strides are made; then tokens [t0, t1) are laid out
 * (a prompt's in parts on several threads, see prepare_chunk). */
static void lay_out_activations(QAct *a, int64_t n_tok, int64_t n, unsigned types, int alloc, int64_t t0,
                                int64_t t1) {
    int64_t gs = a->gs, n_groups = n / gs;
#ifdef __AVX2__
    if ((types & (1u << W_Q4_0)) && gs == BLOCK) {
        if (alloc) {
            int64_t steps = (n_groups + Q4_GROUP - 1) / Q4_GROUP;
            a->q4_stride = steps * Q4_GROUP * BLOCK;
            a->c4_stride = steps * Q4_GROUP;
            a->d4_stride = steps * Q4_GROUP * Q4_D_COPIES;
            a->q4 = scratch_alloc(n_tok * a->q4_stride + 64, 1);
            a->c4 = scratch_alloc((n_tok * a->c4_stride + 16) * sizeof(int32_t), 1);
            a->d4 = scratch_alloc((n_tok * a->d4_stride + 16) * sizeof(float), 1);
        }
        for (int64_t t = t0; t < t1; t++)
            for (int64_t g = 0; g < n_groups; g++) {
                const int8_t *src = a->q + t * n + g * BLOCK;
                int64_t step = g / Q4_GROUP, b = g % Q4_GROUP;
                int8_t *dst = a->q4 + t * a->q4_stride + step * Q4_GROUP * BLOCK;
                for (int k = 0; k < 16; k += 4) { /* chunk k/4 of the block: after k/4 chunks of every block */
                    memcpy(dst + Q4_GROUP * k + 4 * b, src + k, 4);
                    memcpy(dst + Q4_GROUP * 16 + Q4_GROUP * k + 4 * b, src + 16 + k, 4);
                }
                a->c4[t * a->c4_stride + g] = q4_correction(src);
                for (int c = 0; c < Q4_D_COPIES; c++)
                    a->d4[t * a->d4_stride + (step * Q4_D_COPIES + c) * Q4_GROUP + b] = a->d[t * n_groups + g];
            }
    }
    if (((types & (1u << W_Q4_0R | 1u << W_Q8_0R)) && gs == BLOCK) || (types & (1u << W_Q8R))) {
        int64_t nb = n / BLOCK;
        if (alloc) {
            a->q16 = scratch_alloc(n_tok * n + 64, 0);
            a->c16 = scratch_alloc((n_tok * nb + 16) * sizeof(int32_t), 0);
        }
        for (int64_t t = t0; t < t1; t++) {
            const int8_t *x = a->q + t * n;
            int8_t *dst = a->q16 + t * n;
            for (int64_t b0 = 0, G; b0 < nb; b0 += G) {
                G = rg_group(nb - b0);
                if (G == 1) {
                    memcpy(dst + b0 * BLOCK, x + b0 * BLOCK, BLOCK);
                    continue;
                }
                /* vector v: values 4v..4v+3 of each block (Q4_0R: those the low nibbles meet, then the high
                 * ones'; Q8_0R: those its vector v meets) */
                rg_interleave((uint8_t *)dst + b0 * BLOCK, (const uint8_t *)x + b0 * BLOCK, G, 8, BLOCK);
            }
            for (int64_t b = 0; b < nb; b++) a->c16[t * nb + b] = q4_correction(x + b * BLOCK);
        }
#ifdef HAVE_AMX
        if (amx_on && n_tok >= AMX_MIN_TOKENS)
            amx_lay_out(a, n_tok, n, alloc, t0, t1);
#endif
    }
#endif
#ifdef HAVE_ZMM_INT8
    int blocks = (types & (1u << W_Q8_0)) && gs == BLOCK, groups = (types & (1u << W_Q8)) && gs % 64 == 0;
    if (blocks || groups) {
        /* corrections: Q8_0 blocks, per pair of blocks 16 lanes (8 each); runq.c's groups, one each. Scales,
         * for Q8_0 blocks and groups of 64: each repeated over 8 lanes, pairs of blocks or groups padded */
        int64_t per = blocks ? 8 : 1, scales = blocks || gs == 64;
        if (alloc) {
            a->c8_stride = blocks ? (n_groups + 1) / 2 * 16 : n_groups;
            a->d8_stride = scales ? (n_groups + 1) / 2 * 16 : 0;
            a->c8 = scratch_alloc(n_tok * a->c8_stride * sizeof(int32_t), 1);
            a->d8 = scales ? scratch_alloc((n_tok * a->d8_stride + 16) * sizeof(float), 1) : NULL;
        }
        for (int64_t t = t0; t < t1; t++)
            for (int64_t g = 0; g < n_groups; g++) {
                int32_t sum = 0;
                for (int64_t k = 0; k < gs; k++) sum += a->q[t * n + g * gs + k];
                a->c8[t * a->c8_stride + g * per] = -128 * sum;
                if (scales)
                    for (int l = 0; l < 8; l++) a->d8[t * a->d8_stride + g * 8 + l] = a->d[t * n_groups + g];
            }
    }
    if ((types & (1u << W_Q8)) && gs == 32) {
        /* runq.c's groups of 32, two a 64-byte register (lanes 0-7, 8-15), four folded into one (quarter j group
         * j): per four groups 16 corrections, at lanes 0, 4, 8 and 12, and 16 scales, each repeated over its
         * group's 4 lanes */
        if (alloc) {
            int64_t quads = (n_groups + 3) / 4;
            a->c32_stride = quads * 16;
            a->d32_stride = quads * 16;
            a->c32 = scratch_alloc(n_tok * a->c32_stride * sizeof(int32_t), 1);
            a->d32 = scratch_alloc((n_tok * a->d32_stride + 16) * sizeof(float), 1);
        }
        for (int64_t t = t0; t < t1; t++)
            for (int64_t g = 0; g < n_groups; g++) {
                int32_t sum = 0;
                for (int64_t k = 0; k < gs; k++) sum += a->q[t * n + g * gs + k];
                a->c32[t * a->c32_stride + g * 4] = -128 * sum;
                for (int l = 0; l < 4; l++) a->d32[t * a->d32_stride + g * 4 + l] = a->d[t * n_groups + g];
            }
    }
#endif
    /* without SIMD kernels, the plain activations suffice */
    (void)types, (void)n_tok, (void)n_groups, (void)alloc, (void)t0, (void)t1;
}

static void free_activations(QAct *a) {
    void *owned[] = {a->q, a->d, a->q4, a->c4, a->d4, a->c8, a->d8, a->c32, a->d32, a->q16, a->c16, a->xb, a->xdb};
    for (size_t i = 0; i < sizeof owned / sizeof *owned; i++) scratch_free(owned[i]);
}

/* ------------------------------------------------------------------------------------------ products */

/* a thread takes about this many bytes of weights at a time: small enough that a thread descheduled in the
 * middle of one holds up little, large enough for the prefetchers' streams and the claims' atomics */
#define CHUNK_BYTES (32 * 1024)
#define MIN_CHUNKS 8

typedef struct {
    const float *x;
    int64_t n_tok, n;
    const Mat *mats;
    int n_mats;
    float *out;
    int accumulate;
    QAct acts[2]; /* the activations quantized for (at most two) group sizes of the call's matrices */
    int n_acts;
} Product;

static const QAct *acts_for(const Product *p, int64_t gs) {
    return p->acts[0].gs == gs ? &p->acts[0] : &p->acts[1];
}

static void product_chunk(void *ctx, int64_t lo, int64_t hi) {
    const Product *p = ctx;
    for (int j = 0; j < p->n_mats; j++) {
        const Mat *m = &p->mats[j];
        int64_t a = lo > m->row0 ? lo - m->row0 : 0, b = hi - m->row0 < m->rows ? hi - m->row0 : m->rows;
        if (a >= b) continue;
        if (m->type == W_F32) rows_f32(m, a, b, p->x, p->n_tok, p->n, p->out, p->accumulate);
        else if (m->type == W_F16) rows_f16(m, a, b, p->x, p->n_tok, p->n, p->out, p->accumulate);
        else if (m->type == W_BF16) rows_bf16(m, a, b, p->x, p->n_tok, p->n, p->out, p->accumulate);
        else rows_int8(m, a, b, acts_for(p, m->gs), p->n_tok, p->n, p->out, p->accumulate);
    }
}

/* The most tokens of a product the adaptation measures when it is called on its own (engine.py's
 * FUSED_MAX_TOKENS: a decode-sized step). More are a prompt's (the int8 kernel's share of one, where it takes
 * Q4_0 prompts): those follow the last choice as a prompt's sgemm does. Were they measured, a 256-token
 * prompt's 48 products would start the measurement again on their own count (PROBE_JOBS of them in a row),
 * and the next prompt would then run on one thread for the one-thread phase. Every product of a decode step
 * (forward_step, batched ones of any size) is measured. */
#define MEASURED_MAX_TOKENS 8

/* What a product prepares before its rows run, token by token: the fused input (where f asks for one), then for
 * each group size the activations quantized and laid out for the kernels (their buffers made beforehand) */
typedef struct {
    Product *p;
    const float *x;
    const Fusion *f;
    float *fused;
    unsigned types[2];
} Preparation;

/* tokens a part when a prompt's preparation is split: 16, so that one thread writes all of an AMX token tile (its
 * tokens' values share cache lines) */
#define PREPARE_TOKENS 16

/* tokens [lo, hi) of a Preparation: rows independent of each other, so the same numbers however they are split */
static void prepare_chunk(void *ctx, int64_t lo, int64_t hi) {
    const Preparation *prep = ctx;
    Product *p = prep->p;
    if (prep->fused) fused_rows(prep->x, prep->f, lo, hi, p->n, prep->fused);
    for (int i = 0; i < p->n_acts; i++) {
        QAct *a = &p->acts[i];
        quantize_q8(p->x + lo * p->n, hi - lo, p->n, a->gs, a->q + lo * p->n, a->d + lo * (p->n / a->gs));
        lay_out_activations(a, p->n_tok, p->n, prep->types[i], 0, lo, hi);
    }
}

/* matmul, with `measured`: whether the adaptation times it (see MEASURED_MAX_TOKENS), and the distance its int8
 * rows prefetch their weights (prefetch_bytes, or prefetch_cached for a model that fits in the cache) */
static int product(const float *x, int64_t n_tok, int64_t n, const Mat *mats, int n_mats, float *out,
                   const Fusion *f, int measured, int64_t prefetch) {
    Product p = {NULL, n_tok, n, mats, n_mats, out, f != NULL && f->accumulate, {{0}}, 0};
    unsigned types[2] = {0, 0};
    int64_t rows = 0, bytes = 0, max_rb = 1;
    for (int j = 0; j < n_mats; j++) {
        const Mat *m = &mats[j];
        int64_t rb = row_bytes(m, n);
        rows = m->row0 + m->rows > rows ? m->row0 + m->rows : rows;
        bytes += rb * m->rows;
        max_rb = rb > max_rb ? rb : max_rb;
        if (is_dense(m->type)) continue;
        int i = 0;
        while (i < p.n_acts && p.acts[i].gs != m->gs) i++;
        if (i == 2) return 1;
        if (i == p.n_acts) {
            p.acts[p.n_acts].gs = m->gs;
            p.acts[p.n_acts++].prefetch = prefetch;
        }
        types[i] |= 1u << m->type;
    }
    Preparation prep = {&p, x, f, NULL, {types[0], types[1]}};
    if (f != NULL && (f->norm_w != NULL || f->gate != NULL)) prep.fused = scratch_alloc(n_tok * n * sizeof(float), 0);
    p.x = prep.fused ? prep.fused : x;
    for (int i = 0; i < p.n_acts; i++) {
        QAct *a = &p.acts[i];
        a->q = scratch_alloc(n_tok * n + 64, 0); /* + 64: a pair step may read 32 bytes past the last row */
        a->d = scratch_alloc(n_tok * (n / a->gs) * sizeof(float), 0);
        lay_out_activations(a, n_tok, n, types[i], 1, 0, 0);
    }
    if (n_tok > MEASURED_MAX_TOKENS && (prep.fused || p.n_acts)) /* a prompt's: on the pool, 16 tokens a part */
        pool_run_adaptive(prepare_chunk, &prep, n_tok, PREPARE_TOKENS, n_tok * n * (int64_t)sizeof(float), 0,
                          n_tok * n * (int64_t)sizeof(float) >= ATTENTION_MIN_BYTES);
    else
        prepare_chunk(&prep, 0, n_tok);
    int64_t chunk = CHUNK_BYTES / max_rb > 0 ? CHUNK_BYTES / max_rb : 1;
    /* a product of several tokens (a prompt's, a batched decode step's) takes its rows in at least MIN_CHUNKS
     * chunks, so that every thread has a share of a small matrix (the built-in model's, 9-55 KB, would be one or
     * two chunks, on one or two threads, and its batched steps slower: docs/speed.md); not smaller: each chunk
     * reads all the tokens' activations again */
    if (n_tok > 1 && chunk > (rows + MIN_CHUNKS - 1) / MIN_CHUNKS) chunk = (rows + MIN_CHUNKS - 1) / MIN_CHUNKS;
#ifdef HAVE_AMX
    for (int j = 0; j < n_mats; j++) /* whole bands of rows for the tiles (the rest goes to the AVX-512 rows) */
        if (amx_takes(&mats[j], n_tok)) {
            chunk = (chunk + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
            break;
        }
#endif
    pool_run_adaptive(product_chunk, &p, rows, chunk, bytes * n_tok, measured ? n_tok : 0,
                      rows * n * n_tok >= PRODUCT_MIN_MACS);
    for (int i = 0; i < p.n_acts; i++) free_activations(&p.acts[i]);
    scratch_free(prep.fused);
    return 0;
}

/* out = x @ w.T for each matrix of mats (n_mats, stacked in out as their row0 say; any mix of types, each
 * quantized one with a group size dividing n), with the fused forms of f (may be NULL). Returns 0, or 1 when
 * there are more than two group sizes. */
int matmul(const float *x, int64_t n_tok, int64_t n, const Mat *mats, int n_mats, float *out, const Fusion *f) {
    return product(x, n_tok, n, mats, n_mats, out, f, n_tok <= MEASURED_MAX_TOKENS, prefetch_bytes);
}

/* Q4_0 or Q8_0 rows (rows, n) regrouped as Q4_0R or Q8_0R (see W_Q4_0R) into dst (the same size; not src):
 * groups of 4 bytes move */
static void rg_permute_rows(const uint8_t *src, uint8_t *dst, int64_t rows, int64_t n, int words) {
    int64_t nb = n / BLOCK, bb = 2 + 4 * words, rb = nb * bb;
    for (int64_t i = 0; i < rows; i++) {
        const uint8_t *s = src + i * rb;
        uint8_t *d = dst + i * rb;
        for (int64_t b0 = 0, G; b0 < nb; b0 += G) {
            G = rg_group(nb - b0);
            const int64_t at = b0 * bb;
            if (G == 1) {
                memcpy(d + at, s + at, bb);
                continue;
            }
            for (int64_t l = 0; l < G; l++) { /* the scales, after the nibbles or values */
                int64_t block = at + bb * l, scale = at + 4 * words * G + 2 * l;
                memcpy(d + scale, s + block, 2);
            }
            /* the nibbles or values after each block's scale */
            rg_interleave(d + at, s + at + 2, G, words, bb);
        }
    }
}

typedef struct {
    const uint8_t *src;
    uint8_t *dst;
    int64_t n;
    int words;
} Regroup;

static void regroup_chunk(void *ctx, int64_t lo, int64_t hi) {
    const Regroup *r = ctx;
    int64_t rb = r->n / BLOCK * (2 + 4 * r->words);
    rg_permute_rows(r->src + lo * rb, r->dst + lo * rb, hi - lo, r->n, r->words);
}

/* dst = the Q4_0 or Q8_0 (`type`: W_Q4_0, W_Q8_0) matrix src (rows, n) regrouped as Q4_0R or Q8_0R (see
 * W_Q4_0R) for this build's kernels; returns 0, or 1 where the build has no kernel for it (keep the blocks
 * there) */
int regroup_blocks(const uint8_t *src, uint8_t *dst, int64_t rows, int64_t n, int type) {
#ifdef __AVX2__
    if (type != W_Q4_0 && type != W_Q8_0) return 1;
    Regroup r = {src, dst, n, rg_words(type)};
    pool_run(regroup_chunk, &r, rows, 256, rows * (n / BLOCK) * BLOCK_BYTES[type]);
    return 0;
#else
    (void)src, (void)dst, (void)rows, (void)n, (void)type, (void)regroup_chunk;
    return 1;
#endif
}

typedef struct {
    const int8_t *q;
    const float *s;
    uint8_t *dst;
    int64_t n, gs;
} RegroupQ8;

/* rows [lo, hi) of a Q8 matrix as Q8R (see W_Q8R) */
static void regroup_q8_chunk(void *ctx, int64_t lo, int64_t hi) {
    const RegroupQ8 *r = ctx;
    int64_t n = r->n, nb = n / BLOCK, per = r->gs / BLOCK, rb = n + 4 * (n / r->gs);
    for (int64_t i = lo; i < hi; i++) {
        const uint8_t *q = (const uint8_t *)r->q + i * n;
        const float *s = r->s + i * (n / r->gs);
        uint8_t *d = r->dst + i * rb;
        for (int64_t b0 = 0, G; b0 < nb; b0 += G) {
            G = rg_group(nb - b0);
            if (G == 1) G = per; /* past the groups: a group of gs's values, then its scale */
            uint8_t *at = d + b0 * (BLOCK + 4 / per);
            if (G >= 4) rg_interleave(at, q + b0 * BLOCK, G, 8, BLOCK);
            else memcpy(at, q + b0 * BLOCK, G * BLOCK);
            memcpy(at + G * BLOCK, s + b0 / per, 4 * (G / per));
        }
    }
}

/* dst (rows, n + 4 * n / gs bytes) = the Q8 matrix of values q (rows, n) and scales s (rows, n / gs) as Q8R (see
 * W_Q8R) for this build's kernels; returns 0, or 1 where the build has no kernel for it (groups other than 32
 * and 64, no AVX2: keep the matrix as it is there) */
int regroup_q8(const int8_t *q, const float *s, uint8_t *dst, int64_t rows, int64_t n, int64_t gs) {
#ifdef __AVX2__
    if ((gs != 32 && gs != 64) || n % gs) return 1;
    RegroupQ8 r = {q, s, dst, n, gs};
    pool_run(regroup_q8_chunk, &r, rows, 256, rows * n);
    return 0;
#else
    (void)q, (void)s, (void)dst, (void)rows, (void)n, (void)gs, (void)regroup_q8_chunk;
    return 1;
#endif
}

/* o (gs values) = a group's values times its scale: int8 values, or Q4_0's 16 bytes of nibbles (`nibbles`:
 * weights 0-15 in the low nibbles, 16-31 in the high ones, each standing for nibble - 8) */
ALWAYS_INLINE void dequantize_group(const uint8_t *v, int nibbles, int64_t gs, float scale, float *o) {
    int64_t k = 0;
#ifdef __AVX2__
    __m256 vs = _mm256_set1_ps(scale);
    if (!nibbles) {
        for (; k + 8 <= gs; k += 8) {
            __m256i q32 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(v + k)));
            _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(q32), vs));
        }
    } else {
        __m128i q = _mm_loadu_si128((const __m128i *)v), low = _mm_set1_epi8(0x0F);
        __m128i halves[2] = {_mm_and_si128(q, low), _mm_and_si128(_mm_srli_epi16(q, 4), low)};
        for (int h = 0; h < 2; h++)
            for (int c = 0; c < 2; c++) {
                __m128i bytes = c ? _mm_srli_si128(halves[h], 8) : halves[h];
                __m256i q32 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_set1_epi32(8));
                _mm256_storeu_ps(o + 16 * h + 8 * c, _mm256_mul_ps(_mm256_cvtepi32_ps(q32), vs));
            }
        k = gs;
    }
#endif
    for (; k < gs; k++) o[k] = (float)(nibbles ? q4_value(v, k) : (int8_t)v[k]) * scale;
}

/* row i of a quantized m (rows of n weights) as fp32 */
static void dequantize_row(const Mat *m, int64_t i, int64_t n, float *o) {
    if (m->type == W_F32) {
        memcpy(o, (const float *)m->w + i * n, n * sizeof(float));
        return;
    }
    if (m->type == W_F16 || m->type == W_BF16) {
        const uint16_t *h = (const uint16_t *)m->w + i * n;
        int64_t k = 0;
#ifdef __AVX2__
        if (m->type == W_F16)
            for (; k + 8 <= n; k += 8) _mm256_storeu_ps(o + k, w_load8(h, k, W_F16));
        else
            for (; k + 8 <= n; k += 8) _mm256_storeu_ps(o + k, w_load8(h, k, W_BF16));
#endif
        for (; k < n; k++) o[k] = w_get(h, k, m->type);
        return;
    }
    if (m->type == W_Q4_0R || m->type == W_Q8_0R) { /* each block gathered from its group (see W_Q4_0R) */
        const uint8_t *row = (const uint8_t *)m->w + i * row_bytes(m, n);
        int words = rg_words(m->type), nibbles = m->type == W_Q4_0R;
        for (int64_t b0 = 0, nb = n / BLOCK, G; b0 < nb; b0 += G) {
            G = rg_group(nb - b0);
            const uint8_t *at = row + b0 * BLOCK_BYTES[m->type];
            for (int64_t l = 0; l < G; l++) {
                uint8_t block[2 + BLOCK];
                rg_lane(at, G, l, words, block);
                dequantize_group(block + 2, nibbles, BLOCK, fp16_to_f32(load_u16(block)), o + (b0 + l) * BLOCK);
            }
        }
        return;
    }
    if (m->type == W_Q8R) { /* each block gathered from its group (see W_Q8R), scaled by its group's scale */
        const uint8_t *row = (const uint8_t *)m->w + i * row_bytes(m, n);
        int64_t nb = n / BLOCK, per = m->gs / BLOCK, b0 = 0;
        for (int64_t G = rg_group(nb); G > 1 && b0 < nb; b0 += G, G = rg_group(nb - b0)) {
            const uint8_t *at = row + b0 * (BLOCK + 4 / per);
            for (int64_t l = 0; l < G; l++) {
                uint8_t values[BLOCK];
                rg_gather(at, G, l, BLOCK / 4, values);
                dequantize_group(values, 0, BLOCK, load_f32(at + BLOCK * G + 4 * (l / per)), o + (b0 + l) * BLOCK);
            }
        }
        for (; b0 < nb; b0++) { /* past the groups */
            const uint8_t *values, *scale;
            rg_single(row, (int)per, b0, &values, &scale);
            dequantize_group(values, 0, BLOCK, load_f32(scale), o + b0 * BLOCK);
        }
        return;
    }
    int64_t gs = m->type == W_Q8 ? m->gs : BLOCK, n_groups = n / gs;
    const uint8_t *w = m->type == W_Q8 ? (const uint8_t *)m->w + i * n : (const uint8_t *)m->w + i * row_bytes(m, n);
    const float *ws = m->type == W_Q8 ? m->s + i * n_groups : NULL;
    float scale;
    if (m->type == W_Q4_0) { /* a loop per kind, so that each inlines only its own case */
        for (int64_t g = 0; g < n_groups; g++) {
            const uint8_t *v = group_values(w, ws, W_Q4_0, g, BLOCK, &scale);
            dequantize_group(v, 1, BLOCK, scale, o + g * BLOCK);
        }
        return;
    }
    for (int64_t g = 0; g < n_groups; g++) {
        const uint8_t *v = group_values(w, ws, m->type, g, gs, &scale);
        dequantize_group(v, 0, gs, scale, o + g * gs);
    }
}

typedef struct {
    const Mat *m;
    int64_t n;
    float *out;
} Dequantize;

static void dequantize_chunk(void *ctx, int64_t lo, int64_t hi) {
    const Dequantize *d = ctx;
    for (int64_t i = lo; i < hi; i++) dequantize_row(d->m, i, d->n, d->out + i * d->n);
}

/* out (rows, n) = the weights of m as fp32: a prompt's products run in fp32 BLAS, and done in NumPy this would
 * be a large share of a prefill */
void dequantize(const Mat *m, int64_t n, float *out) {
    Dequantize d = {m, n, out};
    pool_run(dequantize_chunk, &d, m->rows, 64, m->rows * n * 4);
}

/* whether any of a[0..n) lies outside [0, end) */
static int out_of_range(const int64_t *a, int64_t n, int64_t end) {
    for (int64_t i = 0; i < n; i++)
        if (a[i] < 0 || a[i] >= end) return 1;
    return 0;
}

/* out (n_rows, n) = the rows `rows` of m as fp32 (a prompt's embedding lookup); 1, before writing anything,
 * when a row index lies outside m */
int dequantize_rows(const Mat *m, const int64_t *rows, int64_t n_rows, int64_t n, float *out) {
    if (out_of_range(rows, n_rows, m->rows)) return 1;
    for (int64_t t = 0; t < n_rows; t++) dequantize_row(m, rows[t], n, out + t * n);
    return 0;
}

/* ------------------------------------------------------------- llama.cpp's other block types, on load */

/* A GGUF file's tensors of other llama.cpp types (Q4_1, Q5_0, Q5_1, Q2_K-Q6_K; ggml.h's numbers below) become
 * Q4_0 or Q8_0 blocks when a model is loaded: each row dequantized to fp32 and quantized again, with the error
 * that adds. The arithmetic is the gguf package's dequantizer's and quant.py's quantizers', operation for
 * operation (a product and a sum are two roundings: nothing here may fuse them into one multiply-add), so the
 * blocks are those of the NumPy route, only made in one pass over the row instead of six. */
#if defined(__clang__) /* clang's pragma holds for the compound statement it opens (at file scope: the file's rest) */
#define NO_FUSED_MULTIPLY_ADD _Pragma("clang fp contract(off)")
#else
#define NO_FUSED_MULTIPLY_ADD
#if defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
#endif

enum { G_Q4_1 = 3, G_Q5_0 = 6, G_Q5_1 = 7, G_Q2_K = 10, G_Q3_K = 11, G_Q4_K = 12, G_Q5_K = 13, G_Q6_K = 14 };
#define QK_K 256

/* weights and bytes per block of the types converted here; 0 for the others */
static void ggml_block_size(int type, int64_t *weights, int64_t *bytes) {
    static const int16_t sizes[][3] = {{G_Q4_1, 32, 20},   {G_Q5_0, 32, 22},   {G_Q5_1, 32, 24},
                                       {G_Q2_K, QK_K, 84}, {G_Q3_K, QK_K, 110}, {G_Q4_K, QK_K, 144},
                                       {G_Q5_K, QK_K, 176}, {G_Q6_K, QK_K, 210}};
    *weights = *bytes = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (sizes[i][0] == type) *weights = sizes[i][1], *bytes = sizes[i][2];
}

/* Q4_K's and Q5_K's 6-bit scale and min of sub-block s (0-7) out of their 12 packed bytes */
static void k_scale_min(const uint8_t *sc, int s, int *scale, int *min) {
    if (s < 4) {
        *scale = sc[s] & 63, *min = sc[4 + s] & 63;
    } else {
        *scale = (sc[4 + s] & 0x0F) | ((sc[s - 4] >> 2) & 0x30);
        *min = (sc[4 + s] >> 4) | ((sc[s] >> 2) & 0x30);
    }
}

/* o[j] = d[j / run] * q[j] - m[j / run] (m NULL: no minus) for j < n: the gguf package's two roundings */
static void scale_values(const int8_t *q, const float *d, const float *m, int run, int n, float *o) {
    NO_FUSED_MULTIPLY_ADD
    for (int s = 0; s < n / run; s++) {
        float ds = d[s], ms = m ? m[s] : 0.0f;
        for (int j = s * run; j < (s + 1) * run; j++) {
            float p = ds * (float)q[j];
            o[j] = m ? p - ms : p;
        }
    }
}

/* one block of `type` at b as fp32 weights (the block's count of them): its integer values and the scales
 * (and mins) of its runs of 16 or 32 first, each run in the package's arithmetic */
static void dequantize_ggml_block(int type, const uint8_t *b, float *o) {
    NO_FUSED_MULTIPLY_ADD
    int8_t q[QK_K];
    float d[16], m[16];
    switch (type) {
    case G_Q4_1: case G_Q5_0: case G_Q5_1: { /* d, [m,] [qh,] 16 bytes of low nibbles: weight j and j + 16 */
        const uint8_t *qs = b + (type == G_Q4_1 ? 4 : type == G_Q5_0 ? 6 : 8);
        uint32_t high = 0;
        if (type != G_Q4_1) memcpy(&high, b + (type == G_Q5_1 ? 4 : 2), 4);
        for (int j = 0; j < 16; j++) q[j] = (int8_t)(qs[j] & 0x0F), q[j + 16] = (int8_t)(qs[j] >> 4);
        for (int j = 0; j < 32; j++) q[j] = (int8_t)(q[j] | ((high >> j) & 1) << 4);
        d[0] = fp16_to_f32(load_u16(b));
        if (type == G_Q5_0) { /* d * (q - 16) */
            for (int j = 0; j < 32; j++) q[j] = (int8_t)(q[j] - 16);
            scale_values(q, d, NULL, 32, 32, o);
        } else { /* Q4_1 and Q5_1 add their min: (d * q) + m */
            m[0] = fp16_to_f32(load_u16(b + 2));
            for (int j = 0; j < 32; j++) {
                float p = d[0] * (float)q[j];
                o[j] = p + m[0];
            }
        }
        break;
    }
    case G_Q2_K: { /* 16 scale bytes (low nibble: scale, high: min), 64 bytes of 2-bit values, d, dmin */
        float dd = fp16_to_f32(load_u16(b + 80)), dmin = fp16_to_f32(load_u16(b + 82));
        for (int s = 0; s < 16; s++) d[s] = dd * (float)(b[s] & 0x0F), m[s] = dmin * (float)(b[s] >> 4);
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int i = 0; i < 32; i++) q[128 * h + 32 * k + i] = (int8_t)((b[16 + 32 * h + i] >> (2 * k)) & 3);
        scale_values(q, d, m, 16, QK_K, o);
        break;
    }
    case G_Q3_K: { /* 32 bytes of high bits, 64 of 2-bit values, 12 of 6-bit scales, d */
        const uint8_t *hmask = b, *sc = b + 96;
        float dd = fp16_to_f32(load_u16(b + 108));
        for (int s = 0; s < 16; s++) {
            int low = (s < 8 ? sc[s] : sc[s - 8] >> 4) & 0x0F, high = (sc[8 + s % 4] >> (2 * (s / 4))) & 3;
            d[s] = dd * (float)((int8_t)(low | high << 4) - 32);
        }
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int i = 0; i < 32; i++) {
                    int e = 128 * h + 32 * k + i;
                    q[e] = (int8_t)(((b[32 + 32 * h + i] >> (2 * k)) & 3) - (((hmask[i] >> (e / 32)) & 1) ? 0 : 4));
                }
        scale_values(q, d, NULL, 16, QK_K, o);
        break;
    }
    case G_Q4_K: case G_Q5_K: { /* d, dmin, 12 bytes of scales and mins, [32 bytes of high bits,] nibbles */
        float dd = fp16_to_f32(load_u16(b)), dmin = fp16_to_f32(load_u16(b + 2));
        const uint8_t *qh = b + 16, *qs = b + (type == G_Q4_K ? 16 : 48);
        for (int s = 0; s < 8; s++) {
            int scale, min;
            k_scale_min(b + 4, s, &scale, &min);
            d[s] = dd * (float)scale, m[s] = dmin * (float)min;
            for (int i = 0; i < 32; i++) q[32 * s + i] = (int8_t)((qs[32 * (s / 2) + i] >> (4 * (s % 2))) & 0x0F);
            if (type == G_Q5_K)
                for (int i = 0; i < 32; i++) q[32 * s + i] = (int8_t)(q[32 * s + i] | ((qh[i] >> s) & 1) << 4);
        }
        scale_values(q, d, m, 32, QK_K, o);
        break;
    }
    case G_Q6_K: { /* 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales, d */
        const uint8_t *ql = b, *qh = b + 128;
        float dd = fp16_to_f32(load_u16(b + 208));
        for (int s = 0; s < 16; s++) d[s] = dd * (float)(int8_t)b[192 + s];
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int i = 0; i < 32; i++) {
                    int low = (ql[64 * h + 32 * (k % 2) + i] >> (4 * (k / 2))) & 0x0F;
                    q[128 * h + 32 * k + i] = (int8_t)((low | ((qh[32 * h + i] >> (2 * k)) & 3) << 4) - 32);
                }
        scale_values(q, d, NULL, 16, QK_K, o);
        break;
    }
    }
}

/* Whether all of a block's 32 weights are finite (a corrupt file's NaN scale makes them NaN) */
static int block_finite(const float *x) {
    int finite = 1;
    for (int j = 0; j < 32; j++) finite &= fabsf(x[j]) <= FLT_MAX;
    return finite;
}

/* The largest magnitude of a block's 32 (finite) weights at *amax, and the first weight of that magnitude, as
 * NumPy's argmax finds it (Q4_0's scale is taken from it with its sign). */
static float block_first_max(const float *x, float *amax) {
    float a = 0.0f;
    for (int j = 0; j < 32; j++) a = fabsf(x[j]) > a ? fabsf(x[j]) : a;
    float first = x[0];
    for (int j = 31; j >= 0; j--) first = fabsf(x[j]) == a ? x[j] : first;
    *amax = a;
    return first;
}

/* sums[0] += the squared error of a block's values q (less `offset`) at scale `stored` against x, as fp32, and
 * sums[1] += the squares of x: eight running sums each, added in order */
static void add_block_error(const float *x, const int *q, int offset, float stored, double *sums) {
    NO_FUSED_MULTIPLY_ADD
    double err[8] = {0}, ref[8] = {0};
    for (int j0 = 0; j0 < 32; j0 += 8)
        for (int k = 0; k < 8; k++) {
            int j = j0 + k;
            float e = (float)(q[j] - offset) * stored - x[j];
            err[k] += (double)e * (double)e;
            ref[k] += (double)x[j] * (double)x[j];
        }
    for (int k = 0; k < 8; k++) sums[0] += err[k], sums[1] += ref[k];
}

/* 32 weights as a Q8_0 or Q4_0 block at out (quant.py's quantize_q8_0 and quantize_q4_0); adds the squared
 * error of its weights as fp32 (the block's dequantization minus x) and the squares of x to sums[0], sums[1]
 * (unless sums is NULL).
 * A block with a weight that is not finite (a corrupt file's scale) gets a NaN scale, which loading refuses. */
static void quantize_block(const float *x, int kind, uint8_t *out, double *sums) {
    NO_FUSED_MULTIPLY_ADD
    if (!block_finite(x)) {
        memset(out, 0, BLOCK_BYTES[kind]);
        memcpy(out, &(uint16_t){0x7e00}, 2);
        if (sums) sums[0] = sums[1] = NAN;
        return;
    }
    float amax;
    float first_max = block_first_max(x, &amax); /* Q4_0: the first weight of largest magnitude */
    float d = kind == W_Q8_0 ? amax / 127.0f : first_max / -8.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
    uint16_t h = f32_to_fp16(d);
    float stored = fp16_to_f32(h);
    memcpy(out, &h, 2);
    int q[32];
    if (kind == W_Q8_0) {
        for (int j = 0; j < 32; j++) { /* halves away from zero, on the fp32 product (exact in double) */
            double v = (double)(x[j] * inv);
            q[j] = (int)(v + (v < 0.0 ? -0.5 : 0.5));
            out[2 + j] = (uint8_t)(int8_t)q[j];
        }
    } else {
        for (int j = 0; j < 32; j++) {
            float v = x[j] * inv;
            v = v + 8.5f;
            q[j] = v >= 15.0f ? 15 : v > 0.0f ? (int)v : 0; /* trunc, at most 15 */
        }
        for (int j = 0; j < 16; j++) out[2 + j] = (uint8_t)(q[j] | q[j + 16] << 4);
    }
    if (sums) add_block_error(x, q, kind == W_Q4_0 ? 8 : 0, stored, sums);
}

/* quant.py's quantize_q4_0_searched, byte for byte: of the scales first_max / -Q4_0_DIVISORS[c] (fp16, as
 * stored), the one whose block rounded to nearest (ties to even) has the least squared error, summed in double
 * in eight lanes added in order (an earlier divisor on a tie). For weights already on another type's grid (a
 * Q5_0 tensor's), where llama.cpp's divisor 8 alone leaves half the values on rounding ties. Error sums as
 * quantize_block's. */
static const float Q4_0_DIVISORS[] = {7.5f, 8.25f}; /* quant.py's, which says why these */

static void quantize_block_q4_0_searched(const float *x, uint8_t *out, double *sums) {
    NO_FUSED_MULTIPLY_ADD
    if (!block_finite(x)) { /* quantize_block's NaN scale, which loading refuses */
        quantize_block(x, W_Q4_0, out, sums);
        return;
    }
    float amax;
    float first_max = block_first_max(x, &amax);
    int best_q[32] = {0};
    uint16_t best_h = 0;
    float best_stored = 0.0f;
    double best_err = 0.0;
    for (int c = 0; c < (int)(sizeof Q4_0_DIVISORS / sizeof Q4_0_DIVISORS[0]); c++) {
        uint16_t h = f32_to_fp16(first_max / -Q4_0_DIVISORS[c]);
        float stored = fp16_to_f32(h), inv = stored != 0.0f ? 1.0f / stored : 0.0f;
        int q[32];
        double lanes[8] = {0}, err = 0.0; /* eight running sums, then added in order: as quant.py adds them */
        for (int j0 = 0; j0 < 32; j0 += 8)
            for (int k = 0; k < 8; k++) {
                int j = j0 + k;
                /* to nearest, ties to even, as NumPy's rint: 1.5 * 2^23 added and taken away (exact for the
                 * |v| < 2^22 here: |x * inv| is at most the divisor), which vectorizes where nearbyintf did not */
                float v = (x[j] * inv + 8.0f + 12582912.0f) - 12582912.0f;
                q[j] = v < 0.0f ? 0 : v > 15.0f ? 15 : (int)v;
                double e = (double)(q[j] - 8) * (double)stored - (double)x[j];
                lanes[k] += e * e;
            }
        for (int k = 0; k < 8; k++) err += lanes[k];
        if (c == 0 || err < best_err) {
            best_err = err, best_h = h, best_stored = stored;
            memcpy(best_q, q, sizeof q);
        }
    }
    memcpy(out, &best_h, 2);
    for (int j = 0; j < 16; j++) out[2 + j] = (uint8_t)(best_q[j] | best_q[j + 16] << 4);
    if (sums) add_block_error(x, best_q, 8, best_stored, sums);
}

/* rows of `cols` weights of ggml type `type` at src as W_Q4_0 (searched: quantize_block_q4_0_searched's) or W_Q8_0
 * (`kind`) blocks at dst, the error's
 * sums added to sums[0..1] row after row; 1, writing nothing, for a type not converted here or rows that its
 * blocks (or 32) do not divide, 2 where memory could not be allocated */
int convert_ggml_rows(int type, const uint8_t *src, int64_t rows, int64_t cols, int kind, int searched,
                      uint8_t *dst, double *sums) {
    int64_t per_block, block_bytes;
    ggml_block_size(type, &per_block, &block_bytes);
    if (per_block == 0 || cols % per_block || cols % BLOCK || (kind != W_Q4_0 && kind != W_Q8_0)) return 1;
    float *row = malloc(cols * sizeof(float));
    if (row == NULL) return 2;
    int64_t in_bytes = cols / per_block * block_bytes, out_bytes = cols / BLOCK * BLOCK_BYTES[kind];
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < cols / per_block; b++)
            dequantize_ggml_block(type, src + r * in_bytes + b * block_bytes, row + b * per_block);
        for (int64_t b = 0; b < cols / BLOCK; b++) {
            uint8_t *block = dst + r * out_bytes + b * BLOCK_BYTES[kind];
            if (kind == W_Q4_0 && searched)
                quantize_block_q4_0_searched(row + b * BLOCK, block, sums);
            else
                quantize_block(row + b * BLOCK, kind, block, sums);
        }
    }
    free(row);
    return 0;
}

typedef struct {
    const float *x;
    int64_t cols;
    int kind;
    uint8_t *dst;
} QuantizeRows;

static void quantize_rows_chunk(void *ctx, int64_t lo, int64_t hi) {
    const QuantizeRows *q = ctx;
    int64_t nb = q->cols / BLOCK, bb = BLOCK_BYTES[q->kind];
    for (int64_t r = lo; r < hi; r++)
        for (int64_t b = 0; b < nb; b++) quantize_block(q->x + r * q->cols + b * BLOCK, q->kind, q->dst + (r * nb + b) * bb, NULL);
}

/* x (rows, cols) as W_Q4_0 or W_Q8_0 (`kind`) blocks at dst, on the pool: quant.py's quantize_q4_0 and
 * quantize_q8_0 byte for byte (a block with a weight that is not finite gets a NaN scale); 1, writing nothing,
 * for rows that 32 does not divide or another kind */
int quantize_blocks(const float *x, int64_t rows, int64_t cols, int kind, uint8_t *dst) {
    if (cols % BLOCK || (kind != W_Q4_0 && kind != W_Q8_0)) return 1;
    QuantizeRows q = {x, cols, kind, dst};
    pool_run(quantize_rows_chunk, &q, rows, (32768 + cols - 1) / cols, rows * cols * (int64_t)sizeof(float));
    return 0;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
#undef NO_FUSED_MULTIPLY_ADD

/* ------------------------------------------------------------------------------- prompts (BLAS sgemm) */

/* A prompt's products are compute-bound and run in the BLAS library's sgemm (NumPy's, handed over by
 * kernels_native.py), called single-threaded from this pool's threads on chunks of weight rows: one pool for
 * everything, and no BLAS thread team whose barriers wait for a descheduled thread on a busy machine. Quantized
 * rows are dequantized chunk by chunk into a scratch buffer, so no fp32 copy of a matrix is ever whole. */
typedef void (*Sgemm32)(int, int, int, int32_t, int32_t, int32_t, float, const float *, int32_t, const float *,
                        int32_t, float, float *, int32_t);
typedef void (*Sgemm64)(int, int, int, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *,
                        int64_t, float, float *, int64_t);
static void *sgemm_fn;
static int sgemm_ilp64;

/* the cblas_sgemm to call (its integers 64-bit when ilp64) */
void set_sgemm(void *fn, int ilp64) {
    sgemm_fn = fn;
    sgemm_ilp64 = ilp64;
}

enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112 };

/* c (m x k, row stride ldc) = a (m x n) @ b (k x n)^T */
static void sgemm_nt(int64_t m, int64_t k, int64_t n, const float *a, const float *b, float *c, int64_t ldc) {
    if (sgemm_ilp64)
        ((Sgemm64)sgemm_fn)(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, m, k, n, 1.0f, a, n, b, n, 0.0f, c, ldc);
    else
        ((Sgemm32)sgemm_fn)(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS, (int32_t)m, (int32_t)k, (int32_t)n, 1.0f,
                            a, (int32_t)n, b, (int32_t)n, 0.0f, c, (int32_t)ldc);
}

typedef struct {
    const float *x;
    int64_t n_tok, n;
    const Mat *mats;
    int n_mats;
    float *out;
} Gemm;

#define GEMM_CHUNK_ROWS 64

/* Work units of a stacked product: each matrix's rows in blocks of GEMM_CHUNK_ROWS counted from its own first
 * row, numbered matrix after matrix. A block is always the same rows of the same matrix, however the units are
 * dealt to threads (or all run on one), so sgemm sees the same shapes and every row's sum is the same whatever
 * the thread count. */
static int64_t gemm_blocks(const Mat *m) { return (m->rows + GEMM_CHUNK_ROWS - 1) / GEMM_CHUNK_ROWS; }

static void gemm_chunk(void *ctx, int64_t lo, int64_t hi) {
    const Gemm *g = ctx;
    float *scratch = NULL;
    int64_t first_unit = 0;
    for (int j = 0; j < g->n_mats && first_unit < hi; j++) {
        const Mat *m = &g->mats[j];
        int64_t blocks = gemm_blocks(m);
        for (int64_t u = lo > first_unit ? lo : first_unit; u < hi && u < first_unit + blocks; u++) {
            int64_t a = (u - first_unit) * GEMM_CHUNK_ROWS;
            int64_t b = a + GEMM_CHUNK_ROWS < m->rows ? a + GEMM_CHUNK_ROWS : m->rows;
            const float *w = (const float *)m->w + a * g->n;
            if (m->type != W_F32) {
                if (!scratch) scratch = malloc(GEMM_CHUNK_ROWS * g->n * sizeof(float));
                for (int64_t i = a; i < b; i++) dequantize_row(m, i, g->n, scratch + (i - a) * g->n);
                w = scratch;
            }
            sgemm_nt(g->n_tok, b - a, g->n, g->x, w, g->out + g->n_tok * m->row0 + a, m->rows);
        }
        first_unit += blocks;
    }
    free(scratch);
}

/* out = x @ w.T for each matrix (stacked as in matmul), in sgemm; returns 1 when no sgemm was set */
int gemm(const float *x, int64_t n_tok, int64_t n, const Mat *mats, int n_mats, float *out) {
    if (!sgemm_fn) return 1;
    int64_t units = 0, rows = 0;
    for (int j = 0; j < n_mats; j++) {
        units += gemm_blocks(&mats[j]);
        rows += mats[j].rows;
    }
    Gemm g = {x, n_tok, n, mats, n_mats, out};
    pool_run(gemm_chunk, &g, units, 1, rows * n * 4 * n_tok);
    return 0;
}

/* ------------------------------------------------------------------- the rest of a decode step */
/* A decode step's other operations are tiny (one vector per token), so in NumPy each costs its call
 * overhead more than its arithmetic; these do them in one call each, with the same formulas as engine.py. */

/* out = x / sqrt(mean(x^2) + eps) * weight, for each of n_tok rows of dim values */
void rmsnorm(const float *x, const float *weight, int64_t n_tok, int64_t dim, float eps, float *out) {
    for (int64_t t = 0; t < n_tok; t++) {
        const float *v = x + t * dim;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; i++) ss += v[i] * v[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) out[t * dim + i] = v[i] * inv * weight[i];
    }
}

/* RoPE in place: rotate pairs (2i, 2i+1) of every head of v (n_tok, n_heads, hs) by token t's angles,
 * cos/sin (n_tok, hs/2) */
void rope(float *v, int64_t n_tok, int64_t n_heads, int64_t hs, const float *cos, const float *sin) {
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t h = 0; h < n_heads; h++) {
            float *p = v + (t * n_heads + h) * hs;
            const float *c = cos + t * (hs / 2), *s = sin + t * (hs / 2);
            for (int64_t i = 0; i < hs / 2; i++) {
                float a = p[2 * i], b = p[2 * i + 1];
                p[2 * i] = a * c[i] - b * s[i];
                p[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
}

#ifdef __AVX2__
/* exp(x) for 8 floats, Cephes' expf: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for precision),
 * exp(r) by a degree-6 polynomial, 2^n put into the exponent bits. Within ~2 ulp of expf; x is clamped to
 * [-87.3, 88.4], where exp(x) stays a normal float. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.37f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}
#endif

/* out = silu(a) * b for one row of n values, silu(x) = x / (1 + exp(-x)) (a row at a time, so that an element's
 * arithmetic, SIMD or scalar tail, does not depend on how many rows a call has) */
static void swiglu_row(const float *a, const float *b, int64_t n, float *out) {
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) {
        __m256 av = _mm256_loadu_ps(a + i), one = _mm256_set1_ps(1.0f);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), av));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(av, _mm256_add_ps(one, e)), _mm256_loadu_ps(b + i)));
    }
#endif
    for (; i < n; i++) out[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
}

typedef struct {
    const float *a, *b;
    int64_t n;
    float *out;
} Swiglu;

static void swiglu_chunk(void *ctx, int64_t lo, int64_t hi) {
    const Swiglu *s = ctx;
    for (int64_t t = lo; t < hi; t++) swiglu_row(s->a + t * s->n, s->b + t * s->n, s->n, s->out + t * s->n);
}

/* out = silu(a) * b for n_tok rows of n values */
void swiglu(const float *a, const float *b, int64_t n_tok, int64_t n, float *out) {
    Swiglu s = {a, b, n, out};
    pool_run(swiglu_chunk, &s, n_tok, 8, n_tok * n * 12);
}

static void swiglu_rows(const float *a, const float *b, int64_t n_tok, int64_t n, float *out) {
    for (int64_t t = 0; t < n_tok; t++) swiglu_row(a + t * n, b + t * n, n, out + t * n);
}

/* The KV cache holds rows of head_size (hs) keys or values: fp32 (KV_F32), IEEE fp16 (KV_F16: half the bytes
 * attention reads), or Q8_0 rows (KV_Q8: hs int8 values, then one fp32 scale for each of the row's kv_groups(hs)
 * groups, value = q * scale; about a quarter of fp32's bytes). Attention's arithmetic is fp32 for all; the loads
 * of cached keys and values differ (kv_load1/kv_load8, q8_dots4 and weighted_values' Q8_0 loop, which the
 * always-inlined functions below receive with a constant type, so each type gets its own code). So may the
 * rounding of the scalar loops (a head size not a multiple of 8, the keys past the last 8): on FMA builds the
 * compiler vectorizes fp32's (products, then summed in order) and multiply-adds fp16's, so an fp16 cache and
 * an fp32 cache holding the same values can differ in the last bit. engine.py's KVCache makes the same rows. */
enum { KV_F32 = 0, KV_F16 = 1, KV_Q8 = 2 };

/* a Q8_0 row's groups: llama.cpp's blocks of 32, or the whole row where hs is not a multiple of 32 (written
 * without a division by a run-time value: these sit in attention's inner loops) */
ALWAYS_INLINE int64_t kv_groups(int64_t hs) { return hs % BLOCK == 0 ? hs / BLOCK : 1; }
ALWAYS_INLINE int64_t kv_group_of(int64_t col, int64_t hs) { return hs % BLOCK == 0 ? col / BLOCK : 0; }

ALWAYS_INLINE int64_t kv_row_bytes(int type, int64_t hs) {
    return type == KV_Q8 ? hs + (int64_t)sizeof(float) * kv_groups(hs) : (type == KV_F16 ? 2 : 4) * hs;
}

/* a Q8_0 row's scale for value `col` */
ALWAYS_INLINE float kv_scale(const int8_t *row, int64_t col, int64_t hs) {
    float d;
    memcpy(&d, row + hs + sizeof(float) * kv_group_of(col, hs), sizeof(float));
    return d;
}

/* value `col` of row `row` of cache memory p (rows of hs values) as fp32 */
ALWAYS_INLINE float kv_load1(const void *p, int64_t row, int64_t col, int64_t hs, int type) {
    if (type == KV_Q8) {
        const int8_t *r = (const int8_t *)p + row * kv_row_bytes(KV_Q8, hs);
        return (float)r[col] * kv_scale(r, col, hs);
    }
    int64_t i = row * hs + col;
    return type == KV_F16 ? fp16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#ifdef __AVX2__
/* 8 int8 values as fp32 */
ALWAYS_INLINE __m256 int8x8_to_ps(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* values col..col+7 of row `row` of fp32 or fp16 cache memory p as fp32 (col a multiple of 8, and hs too;
 * Q8_0 rows are read by q8_dots4 and weighted_values, which apply a group's scale once) */
ALWAYS_INLINE __m256 kv_load8(const void *p, int64_t row, int64_t col, int64_t hs, int type) {
    int64_t i = row * hs + col;
    if (type == KV_F32) return _mm256_loadu_ps((const float *)p + i);
#ifdef __F16C__
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
#else
    float t[8];
    for (int j = 0; j < 8; j++) t[j] = fp16_to_f32(((const uint16_t *)p)[i + j]);
    return _mm256_loadu_ps(t);
#endif
}
#endif

/* x (hs values) stored as row `row` of cache memory p: copied (fp32), each value rounded to the nearest fp16,
 * ties to even (the same value whichever of the paths below converts it), or quantized per group (Q8_0, as
 * quantize_q8 does the activations). Returns 1 where a value became an fp16 infinity (|x| beyond 65,504):
 * attention would then read a key or value the model never computed, and score it as -inf or NaN. */
static int kv_store(void *p, int64_t row, const float *x, int64_t hs, int type) {
    if (type == KV_F32) {
        memcpy((float *)p + row * hs, x, hs * sizeof(float));
        return 0;
    }
    if (type == KV_Q8) {
        int8_t *r = (int8_t *)p + row * kv_row_bytes(KV_Q8, hs);
        float scales[kv_groups(hs)];
        quantize_q8(x, 1, hs, hs / kv_groups(hs), r, scales);
        memcpy(r + hs, scales, sizeof scales);
        return 0;
    }
    uint16_t *o = (uint16_t *)p + row * hs;
    int64_t i = 0;
#if defined(HAVE_AVX512)
    for (; i + 16 <= hs; i += 16)
        _mm256_storeu_si256((__m256i *)(o + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
#ifdef __F16C__
    for (; i + 8 <= hs; i += 8)
        _mm_storeu_si128((__m128i *)(o + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < hs; i++) o[i] = f32_to_fp16(x[i]);
    int infinite = 0;
    for (i = 0; i < hs; i++) infinite |= (o[i] & 0x7FFF) == 0x7C00;
    return infinite;
}

/* While the keys of rows [p, p + n) are scored, ask for the same rows' values: attention reads a head's values
 * only after its softmax, and a short run of rows (a head's 16-64 KB at the contexts of a 110M decode) gives the
 * hardware prefetchers little to follow, so without this the values came from DRAM a few lines at a time.
 * fp16 and Q8_0 caches only: fp32 rows are twice as long, and asking for eight of them (2 KB) beside the
 * eight keys being read made attention slower. Off with -DKV_PREFETCH=0 (for measurements). */
#ifndef KV_PREFETCH
#define KV_PREFETCH 1
#endif
ALWAYS_INLINE void prefetch_values(const void *values, int64_t p, int64_t n, int64_t row_bytes) {
    const char *v = (const char *)values + p * row_bytes;
    if (KV_PREFETCH)
        for (int64_t off = 0; off < n * row_bytes; off += 64) __builtin_prefetch(v + off);
}

#ifdef __AVX2__
/* the dot products of q with four Q8_0 rows (r, r + rb, r + 2 rb, r + 3 rb; hs a multiple of 8; the last of
 * n rows standing in for those past it) as eight partial sums each, acc[j]: per group, q times the row's int8
 * values, then scaled by the row's scale for the group (kv_load8's per-value scaling would cost two more
 * instructions per 8 values) */
ALWAYS_INLINE void q8_dots4(const float *q, const int8_t *r0, int64_t rb, int64_t n, int64_t hs, __m256 *acc) {
    int64_t ng = kv_groups(hs), g = hs / ng;
    const int8_t *r[4];
    UNROLL
    for (int j = 0; j < 4; j++) r[j] = r0 + (j < n ? j : n - 1) * rb;
    UNROLL
    for (int j = 0; j < 4; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < ng; gi++) {
        __m256 part[4];
        UNROLL
        for (int j = 0; j < 4; j++) part[j] = _mm256_setzero_ps();
        for (int64_t i = gi * g; i < (gi + 1) * g; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
            UNROLL
            for (int j = 0; j < 4; j++) part[j] = _mm256_fmadd_ps(int8x8_to_ps(r[j] + i), qv, part[j]);
        }
        UNROLL
        for (int j = 0; j < 4; j++)
            acc[j] = _mm256_fmadd_ps(part[j], _mm256_set1_ps(kv_scale(r[j], gi * g, hs)), acc[j]);
    }
}

/* the scaled scores of four Q8_0 keys from row p (the last of n standing in for those past it) */
ALWAYS_INLINE __m128 q8_scores4(const float *q, const int8_t *keys, int64_t p, int64_t n, int64_t hs, float scale) {
    int64_t rb = kv_row_bytes(KV_Q8, hs);
    __m256 acc[4];
    q8_dots4(q, keys + p * rb, rb, n, hs, acc);
    /* lanes 0-3: the four keys' sums of lanes 0-3, lanes 4-7 of lanes 4-7; then the halves added */
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    return _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)), _mm_set1_ps(scale));
}

/* attention_scores for Q8_0 rows (hs a multiple of 8), four keys at a time (q8_dots4), the last 1-3 keys as a
 * four with the last key repeated (every key's score the same arithmetic; a repeat cannot change the maximum) */
ALWAYS_INLINE void q8_scores(const float *q, const int8_t *keys, const void *values, int64_t n_pos, int64_t hs,
                             float scale, float *scores, __m128 *vmax) {
    int64_t p = 0;
    for (; p + 4 <= n_pos; p += 4) {
        prefetch_values(values, p, 4, kv_row_bytes(KV_Q8, hs));
        __m128 dots = q8_scores4(q, keys, p, 4, hs, scale);
        _mm_storeu_ps(scores + p, dots);
        *vmax = _mm_max_ps(*vmax, dots);
    }
    if (p < n_pos) {
        float last[4];
        __m128 dots = q8_scores4(q, keys, p, n_pos - p, hs, scale);
        _mm_storeu_ps(last, dots);
        memcpy(scores + p, last, (n_pos - p) * sizeof(float));
        *vmax = _mm_max_ps(*vmax, dots);
    }
}

/* the scaled dot products of q with eight fp32 or fp16 keys from row p (hs a multiple of 8; the last of n keys
 * standing in for those past it): eight sums accumulated side by side, then reduced into one vector of eight
 * with a tree of horizontal adds */
ALWAYS_INLINE __m256 scores8(const float *q, const void *keys, int64_t p, int64_t n, int64_t hs, int type,
                             float scale) {
    int64_t row[8];
    UNROLL
    for (int j = 0; j < 8; j++) row[j] = p + (j < n ? j : n - 1);
    __m256 acc[8];
    UNROLL
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < hs; i += 8) {
        __m256 qv = _mm256_loadu_ps(q + i);
        UNROLL
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(kv_load8(keys, row[j], i, hs, type), qv, acc[j]);
    }
    __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    __m256 dots = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
    return _mm256_mul_ps(dots, _mm256_set1_ps(scale));
}
#endif

/* scores[p] = dot(q, keys[p]) * scale for p < n_pos (keys (n_pos, hs) contiguous, of cache type `type`);
 * returns the maximum. Where the vector loops run (AVX2, hs a multiple of 8), every key's score is the same
 * arithmetic wherever it falls, a block's last keys too. */
ALWAYS_INLINE float attention_scores(const float *q, const void *keys, const void *values, int type, int64_t n_pos,
                                     int64_t hs, float scale, float *scores) {
    float max = -INFINITY;
    int64_t p = 0;
#ifdef __AVX2__
    if (type == KV_Q8 && hs % 8 == 0) {
        __m128 vmax = _mm_set1_ps(-INFINITY);
        q8_scores(q, keys, values, n_pos, hs, scale, scores, &vmax);
        p = n_pos;
        float lanes[4];
        _mm_storeu_ps(lanes, vmax);
        for (int j = 0; j < 4; j++) max = fmaxf(max, lanes[j]);
    } else if (hs % 8 == 0) {
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        for (; p + 8 <= n_pos; p += 8) {
            if (type != KV_F32) prefetch_values(values, p, 8, kv_row_bytes(type, hs));
            __m256 dots = scores8(q, keys, p, 8, hs, type, scale);
            _mm256_storeu_ps(scores + p, dots);
            vmax = _mm256_max_ps(vmax, dots);
        }
        if (p < n_pos) { /* the last 1-7 keys as eight, the last repeated: it cannot change the maximum */
            float last[8];
            __m256 dots = scores8(q, keys, p, n_pos - p, hs, type, scale);
            _mm256_storeu_ps(last, dots);
            memcpy(scores + p, last, (n_pos - p) * sizeof(float));
            vmax = _mm256_max_ps(vmax, dots);
            p = n_pos;
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, vmax);
        for (int j = 0; j < 8; j++) max = fmaxf(max, lanes[j]);
    }
#endif
    for (; p < n_pos; p++) {
        float dot = 0.0f;
        for (int64_t i = 0; i < hs; i++) dot += q[i] * kv_load1(keys, p, i, hs, type);
        scores[p] = dot * scale;
        max = fmaxf(max, scores[p]);
    }
    return max;
}

/* scores[p] = exp(scores[p] - max) in place; returns their sum */
static float softmax_weights(float *scores, int64_t n_pos, float max) {
    float sum = 0.0f;
    int64_t p = 0;
#ifdef __AVX2__
    __m256 vsum = _mm256_setzero_ps(), vmax = _mm256_set1_ps(max);
    for (; p + 8 <= n_pos; p += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + p), vmax));
        _mm256_storeu_ps(scores + p, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = hsum8(vsum);
#endif
    for (; p < n_pos; p++) {
        scores[p] = expf(scores[p] - max);
        sum += scores[p];
    }
    return sum;
}

#ifdef __AVX2__
/* out[0 : 8 nv] = inv_sum * sum_p weights[p] * values[p][c0 : c0 + 8 nv] (values rows hs apart, of cache type
 * `type`), the sums kept in nv registers; called with a constant nv so that they stay there */
ALWAYS_INLINE void weighted_values(const float *weights, const void *values, int type, int64_t c0, int64_t n_pos,
                                   int64_t hs, int nv, float inv_sum, float *out) {
    __m256 acc[8];
    UNROLL
    for (int c = 0; c < nv; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t p = 0; p < n_pos; p++) {
        if (type == KV_Q8) { /* each group's scale folded into the position's weight */
            const int8_t *r = (const int8_t *)values + p * kv_row_bytes(KV_Q8, hs);
            __m256 wg = _mm256_setzero_ps();
            UNROLL
            for (int c = 0; c < nv; c++) {
                int64_t col = c0 + 8 * c;
                if (c == 0 || (hs % BLOCK == 0 && col % BLOCK == 0))
                    wg = _mm256_set1_ps(weights[p] * kv_scale(r, col, hs));
                acc[c] = _mm256_fmadd_ps(wg, int8x8_to_ps(r + col), acc[c]);
            }
            continue;
        }
        __m256 wp = _mm256_broadcast_ss(weights + p);
        UNROLL
        for (int c = 0; c < nv; c++)
            acc[c] = _mm256_fmadd_ps(wp, kv_load8(values, p, c0 + 8 * c, hs, type), acc[c]);
    }
    UNROLL
    for (int c = 0; c < nv; c++) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv_sum)));
}
#endif

/* out = sum_p weights[p] / sum * values[p] over n_pos rows of hs values (of cache type `type`) */
ALWAYS_INLINE void attention_output(const float *weights, const void *values, int type, int64_t n_pos, int64_t hs,
                                    float sum, float *out) {
    float inv_sum = 1.0f / sum;
#ifdef __AVX2__
    if (hs % 8 == 0) {
        for (int64_t c0 = 0; c0 < hs; c0 += 64) {
            int nv = hs - c0 >= 64 ? 8 : (int)(hs - c0) / 8;
            switch (nv) {
#define WEIGHTED_VALUES(k) \
    case k: weighted_values(weights, values, type, c0, n_pos, hs, k, inv_sum, out + c0); break;
                WEIGHTED_VALUES(1) WEIGHTED_VALUES(2) WEIGHTED_VALUES(3) WEIGHTED_VALUES(4)
                WEIGHTED_VALUES(5) WEIGHTED_VALUES(6) WEIGHTED_VALUES(7) WEIGHTED_VALUES(8)
#undef WEIGHTED_VALUES
            }
        }
        return;
    }
#endif
    for (int64_t i = 0; i < hs; i++) out[i] = 0.0f;
    for (int64_t p = 0; p < n_pos; p++) {
        float wgt = weights[p] * inv_sum;
        for (int64_t i = 0; i < hs; i++) out[i] += wgt * kv_load1(values, p, i, hs, type);
    }
}

#ifdef __AVX2__
/* Queries that read the same keys and values (a grouped-query model's heads of one kv head, a prompt's
 * tokens of one head) share one pass over them: each key's and value's 8 values are loaded (and, from an fp16
 * cache, converted) once for up to ATT_QUERIES queries instead of once per query, which is what bounds
 * attention where the rows sit in cache. Each (query, key) dot product and each query's weighted sum of
 * values is computed in the same order as attention_scores and weighted_values compute it for a query alone
 * (the same lanes, the same tree of horizontal adds, positions in order), so a query gets the same bits
 * whichever block it is in. fp32 and fp16 caches (Q8_0 rows keep the one-query path). */
/* ATT_QUERIES: queries a block at most; ATT_CHUNKS: the 8-value chunks of a value row block_values reads in one
 * pass. Measured best on the 1B shape's decode and 256-token prompts: 8 and 4 with AVX-512's 32 vector registers,
 * 4 and 2 with AVX2's 16 (larger ones spill). */
#ifndef ATT_QUERIES /* -DATT_QUERIES= and -DATT_CHUNKS= set them for measurements */
#ifdef HAVE_AVX512
#define ATT_QUERIES 8
#else
#define ATT_QUERIES 4
#endif
#endif
#ifndef ATT_CHUNKS
#ifdef HAVE_AVX512
#define ATT_CHUNKS 4
#else
#define ATT_CHUNKS 2
#endif
#endif

/* scores_j[p] = dot(q_j, keys[p]) * scale for n queries and keys [0, end), end a multiple of 4; keys two at a
 * time (two rows' 8 values in registers, each used by the n queries), four to a tree of horizontal adds, as
 * attention_scores' 8-key tree reduces each half */
ALWAYS_INLINE void block_scores(const float *const *q, int n, const void *keys, const void *values, int type,
                                int64_t end, int64_t hs, float scale, float *const *scores) {
    for (int64_t p = 0; p < end; p += 4) {
        if (type != KV_F32) prefetch_values(values, p, 4, kv_row_bytes(type, hs));
        __m256 half[ATT_QUERIES];
        UNROLL
        for (int pair = 0; pair < 2; pair++) {
            __m256 a0[ATT_QUERIES], a1[ATT_QUERIES];
            UNROLL
            for (int j = 0; j < n; j++) a0[j] = a1[j] = _mm256_setzero_ps();
            for (int64_t i = 0; i < hs; i += 8) {
                __m256 k0 = kv_load8(keys, p + 2 * pair, i, hs, type);
                __m256 k1 = kv_load8(keys, p + 2 * pair + 1, i, hs, type);
                UNROLL
                for (int j = 0; j < n; j++) {
                    __m256 qv = _mm256_loadu_ps(q[j] + i);
                    a0[j] = _mm256_fmadd_ps(k0, qv, a0[j]);
                    a1[j] = _mm256_fmadd_ps(k1, qv, a1[j]);
                }
            }
            UNROLL
            for (int j = 0; j < n; j++) {
                __m256 h = _mm256_hadd_ps(a0[j], a1[j]);
                half[j] = pair ? _mm256_hadd_ps(half[j], h) : h;
            }
        }
        UNROLL
        for (int j = 0; j < n; j++) {
            __m128 dots = _mm_add_ps(_mm256_castps256_ps128(half[j]), _mm256_extractf128_ps(half[j], 1));
            _mm_storeu_ps(scores[j] + p, _mm_mul_ps(dots, _mm_set1_ps(scale)));
        }
    }
}

/* the largest of x[0 : n] (four chains of maxima: one would wait on each max's latency) */
static float max_of(const float *x, int64_t n) {
    __m256 m[4];
    UNROLL
    for (int c = 0; c < 4; c++) m[c] = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        UNROLL
        for (int c = 0; c < 4; c++) m[c] = _mm256_max_ps(m[c], _mm256_loadu_ps(x + i + 8 * c));
    }
    for (; i + 8 <= n; i += 8) m[0] = _mm256_max_ps(m[0], _mm256_loadu_ps(x + i));
    float lanes[8], max = -INFINITY;
    _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3])));
    for (int j = 0; j < 8; j++) max = fmaxf(max, lanes[j]);
    for (; i < n; i++) max = fmaxf(max, x[i]);
    return max;
}

/* out_j[c0 : c0 + 8 nv] = inv_sum[j] * sum_p w_j[p] * values[p][c0 : c0 + 8 nv] for n queries: positions
 * [0, common) for all of them at once (each row's 8 nv values loaded once), then each query's own positions
 * up to n_pos[j]; called with constant n and nv */
ALWAYS_INLINE void block_values(float *const *w, const int64_t *n_pos, int n, int64_t common, const void *values,
                                int type, int64_t c0, int64_t hs, int nv, const float *inv_sum, float *const *out) {
    __m256 acc[ATT_QUERIES][ATT_CHUNKS];
    UNROLL
    for (int j = 0; j < n; j++) {
        UNROLL
        for (int c = 0; c < nv; c++) acc[j][c] = _mm256_setzero_ps();
    }
    for (int64_t p = 0; p < common; p++) {
        __m256 v[ATT_CHUNKS];
        UNROLL
        for (int c = 0; c < nv; c++) v[c] = kv_load8(values, p, c0 + 8 * c, hs, type);
        UNROLL
        for (int j = 0; j < n; j++) {
            __m256 wp = _mm256_broadcast_ss(w[j] + p);
            UNROLL
            for (int c = 0; c < nv; c++) acc[j][c] = _mm256_fmadd_ps(wp, v[c], acc[j][c]);
        }
    }
    UNROLL
    for (int j = 0; j < n; j++) {
        for (int64_t p = common; p < n_pos[j]; p++) {
            __m256 wp = _mm256_broadcast_ss(w[j] + p);
            UNROLL
            for (int c = 0; c < nv; c++)
                acc[j][c] = _mm256_fmadd_ps(wp, kv_load8(values, p, c0 + 8 * c, hs, type), acc[j][c]);
        }
        UNROLL
        for (int c = 0; c < nv; c++)
            _mm256_storeu_ps(out[j] + c0 + 8 * c, _mm256_mul_ps(acc[j][c], _mm256_set1_ps(inv_sum[j])));
    }
}

/* attention for n queries over one kv head's keys and values (fp32 or fp16, hs a multiple of 8): the scores
 * of the keys all of them have (whole fours) in block_scores, each query's other keys as a query alone
 * (attention_scores from there on), softmax each, then the weighted values in block_values */
ALWAYS_INLINE void attend_block(const float *const *q, const int64_t *n_pos, int n, const void *keys,
                                const void *values, int type, int64_t hs, float *const *scores, float *const *out) {
    float scale = 1.0f / sqrtf((float)hs), inv_sum[ATT_QUERIES];
    int64_t common = n_pos[0];
    for (int j = 1; j < n; j++) common = n_pos[j] < common ? n_pos[j] : common;
    int64_t scored = common - common % 4; /* block_scores' keys come in fours */
    block_scores(q, n, keys, values, type, scored, hs, scale, scores);
    for (int j = 0; j < n; j++) {
        float rest = attention_scores(q[j], (const char *)keys + scored * kv_row_bytes(type, hs),
                                      (const char *)values + scored * kv_row_bytes(type, hs), type,
                                      n_pos[j] - scored, hs, scale, scores[j] + scored);
        float max = fmaxf(max_of(scores[j], scored), rest);
        inv_sum[j] = 1.0f / softmax_weights(scores[j], n_pos[j], max);
    }
    for (int64_t c0 = 0; c0 < hs; c0 += 8 * ATT_CHUNKS) {
        int nv = hs - c0 >= 8 * ATT_CHUNKS ? ATT_CHUNKS : (int)(hs - c0) / 8;
        switch (nv) {
#define BLOCK_VALUES(k) \
    case k: \
        if (k <= ATT_CHUNKS) block_values(scores, n_pos, n, common, values, type, c0, hs, k, inv_sum, out); \
        break;
            BLOCK_VALUES(1) BLOCK_VALUES(2) BLOCK_VALUES(3) BLOCK_VALUES(4)
#undef BLOCK_VALUES
        }
    }
}
#else
#define ATT_QUERIES 1
#endif

typedef struct {
    const float *q;
    const void *kc, *vc;
    int kv_type;
    const int64_t *slots, *positions;
    int64_t n_tok, n_heads, kv_heads, seq_len, hs, max_pos;
    int64_t heads_per_block, tokens_per_block; /* the blocks of queries attention_task takes */
    float *out;
} Attention;

/* A task is a block of queries: heads_per_block query heads of one kv head (a head set) for tokens_per_block
 * consecutive tokens (a token block); those of one slot among them read the same keys and values. Task = head set
 * * token_blocks + token block: head-major, so that a prompt's consecutive tasks reuse one kv head's keys and
 * values from cache. */
ALWAYS_INLINE int64_t sets_per_kv_head(const Attention *a) {
    return (a->n_heads / a->kv_heads + a->heads_per_block - 1) / a->heads_per_block;
}

ALWAYS_INLINE int64_t head_sets(const Attention *a) { return a->kv_heads * sets_per_kv_head(a); }

ALWAYS_INLINE int64_t token_blocks(const Attention *a) {
    return (a->n_tok + a->tokens_per_block - 1) / a->tokens_per_block;
}

/* one query alone: head h of token t over its slot's cached positions 0..position */
ALWAYS_INLINE void attend_one(const Attention *a, int64_t h, int64_t t, float *scores, int type) {
    int64_t group = a->n_heads / a->kv_heads, hs = a->hs;
    float scale = 1.0f / sqrtf((float)hs);
    int64_t n_pos = a->positions[t] + 1;
    int64_t head = (a->slots[t] * a->kv_heads + h / group) * a->seq_len * kv_row_bytes(type, hs); /* bytes */
    const void *keys = (const char *)a->kc + head, *values = (const char *)a->vc + head;
    float max = attention_scores(a->q + (t * a->n_heads + h) * hs, keys, values, type, n_pos, hs, scale, scores);
    float sum = softmax_weights(scores, n_pos, max);
    attention_output(scores, values, type, n_pos, hs, sum, a->out + (t * a->n_heads + h) * hs);
}

/* one task: its block's queries, each run of one slot's tokens together (attend_block), a query alone where no
 * other in the block shares its keys */
ALWAYS_INLINE void attention_task(const Attention *a, int64_t task, float *scores, int type) {
    int64_t group = a->n_heads / a->kv_heads, per_group = sets_per_kv_head(a);
    int64_t set = task / token_blocks(a), tb = task % token_blocks(a);
    int64_t kvh = set / per_group, h0 = kvh * group + set % per_group * a->heads_per_block;
    int64_t h1 = h0 + a->heads_per_block < (kvh + 1) * group ? h0 + a->heads_per_block : (kvh + 1) * group;
    int64_t t0 = tb * a->tokens_per_block;
    int64_t t1 = t0 + a->tokens_per_block < a->n_tok ? t0 + a->tokens_per_block : a->n_tok;
#ifdef __AVX2__
    if (type != KV_Q8 && a->hs % 8 == 0) {
        int64_t stride = a->max_pos + 1;
        for (int64_t t = t0; t < t1;) {
            int64_t run = t + 1; /* tokens of t's slot */
            while (run < t1 && a->slots[run] == a->slots[t]) run++;
            const float *q[ATT_QUERIES];
            float *out[ATT_QUERIES], *sc[ATT_QUERIES];
            int64_t n_pos[ATT_QUERIES];
            int n = 0;
            for (int64_t u = t; u < run; u++)
                for (int64_t h = h0; h < h1; h++, n++) {
                    q[n] = a->q + (u * a->n_heads + h) * a->hs;
                    out[n] = a->out + (u * a->n_heads + h) * a->hs;
                    sc[n] = scores + n * stride;
                    n_pos[n] = a->positions[u] + 1;
                }
            int64_t head = (a->slots[t] * a->kv_heads + kvh) * a->seq_len * kv_row_bytes(type, a->hs);
            const void *keys = (const char *)a->kc + head, *values = (const char *)a->vc + head;
            switch (n) {
            case 1: attend_one(a, h0, t, scores, type); break;
#define ATTEND_BLOCK(k) \
    case k: if (k <= ATT_QUERIES) attend_block(q, n_pos, k, keys, values, type, a->hs, sc, out); break;
            ATTEND_BLOCK(2) ATTEND_BLOCK(3) ATTEND_BLOCK(4) ATTEND_BLOCK(5) ATTEND_BLOCK(6) ATTEND_BLOCK(7)
            ATTEND_BLOCK(8)
#undef ATTEND_BLOCK
            }
            t = run;
        }
        return;
    }
#endif
    for (int64_t t = t0; t < t1; t++)
        for (int64_t h = h0; h < h1; h++) attend_one(a, h, t, scores, type);
}

/* tasks [lo, hi) */
static void attention_chunk(void *ctx, int64_t lo, int64_t hi) {
    const Attention *a = ctx;
    float *scores = malloc(a->heads_per_block * a->tokens_per_block * (a->max_pos + 1) * sizeof(float));
    for (int64_t task = lo; task < hi; task++) {
        if (a->kv_type == KV_F16)
            attention_task(a, task, scores, KV_F16);
        else if (a->kv_type == KV_Q8)
            attention_task(a, task, scores, KV_Q8);
        else
            attention_task(a, task, scores, KV_F32);
    }
    free(scores);
}

/* The blocks a step's tasks take: a kv head's query heads, up to ATT_QUERIES, then tokens to fill the block where
 * a slot has consecutive tokens (a prompt; a batched decode step's tokens share nothing, and blocks of them would
 * only make fewer tasks); smaller while that would leave the pool fewer tasks than threads. One query a task where
 * the cache (Q8_0) or the head size (not a multiple of 8) keeps each query on attend_one. */
static void attention_blocks(Attention *a) {
    int64_t group = a->n_heads / a->kv_heads;
    a->heads_per_block = a->tokens_per_block = 1;
    if (ATT_QUERIES == 1 || a->kv_type == KV_Q8 || a->hs % 8 != 0) return;
    int runs = 0;
    for (int64_t t = 1; t < a->n_tok && !runs; t++) runs = a->slots[t] == a->slots[t - 1];
    a->heads_per_block = group < ATT_QUERIES ? group : ATT_QUERIES;
    a->tokens_per_block = runs ? ATT_QUERIES / a->heads_per_block : 1;
    while (a->tokens_per_block > 1 && head_sets(a) * token_blocks(a) < pool.threads) a->tokens_per_block--;
    while (a->heads_per_block > 1 && head_sets(a) * token_blocks(a) < pool.threads) a->heads_per_block--;
}

/* One attention step for n_tok tokens, each with its own sequence slot and position (a decode step, a
 * batched one, a prompt): RoPE on q (n_tok, n_heads, hs) and k (n_tok, kv_heads, hs) in place with each
 * token's cos/sin (n_tok, hs/2); k and v stored in the layer's cache kc, vc (slots, kv_heads, seq_len rows
 * of hs values: fp32, fp16 or Q8_0 as kv_type says) at (slot, position); then each token's causal attention
 * over its slot's positions 0..position (all keys are stored first, so tokens of one sequence see each
 * other's). Query head h reads kv head h / (n_heads / kv_heads). out (n_tok, n_heads * hs). One (head, token)
 * pair per task, head-major so that a prompt's consecutive tasks reuse one head's keys and values from cache. */
static int attention_split_from(int64_t min_bytes, float *q, float *k, const float *v, const float *cos,
                                 const float *sin, void *kc, void *vc, int kv_type, const int64_t *slots,
                                 const int64_t *positions, int64_t n_tok, int64_t n_heads, int64_t kv_heads,
                                 int64_t seq_len, int64_t hs, float *out) {
    rope(q, n_tok, n_heads, hs, cos, sin);
    rope(k, n_tok, kv_heads, hs, cos, sin);
    int64_t max_pos = 0, work = 0;
    int overflow = 0;
    for (int64_t t = 0; t < n_tok; t++) {
        max_pos = positions[t] > max_pos ? positions[t] : max_pos;
        work += 2 * kv_row_bytes(kv_type, hs) * (positions[t] + 1) * n_heads; /* bytes of keys and values read */
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t at = (slots[t] * kv_heads + h) * seq_len + positions[t]; /* row */
            overflow |= kv_store(kc, at, k + (t * kv_heads + h) * hs, hs, kv_type);
            overflow |= kv_store(vc, at, v + (t * kv_heads + h) * hs, hs, kv_type);
        }
    }
    Attention a = {q, kc, vc, kv_type, slots, positions, n_tok, n_heads, kv_heads, seq_len, hs, max_pos, 1, 1, out};
    attention_blocks(&a);
    pool_run_adaptive(attention_chunk, &a, head_sets(&a) * token_blocks(&a), 1, work, 0, work >= min_bytes);
    return overflow;
}

/* the attention step on its own (a prompt's, between BLAS products): split across threads as products are.
 * Returns 1 where a key or value overflowed an fp16 cache (see kv_store), else 0. */
int attention_step(float *q, float *k, const float *v, const float *cos, const float *sin, void *kc, void *vc,
                    int kv_type, const int64_t *slots, const int64_t *positions, int64_t n_tok, int64_t n_heads,
                    int64_t kv_heads, int64_t seq_len, int64_t hs, float *out) {
    return attention_split_from(PARALLEL_MIN_BYTES, q, k, v, cos, sin, kc, vc, kv_type, slots, positions, n_tok,
                                n_heads, kv_heads, seq_len, hs, out);
}

/* ------------------------------------------------------------------- a whole decode step's layers */

/* One layer's weights: its matrices as the products take them (wq/wk/wv and w1/w3 stacked into one
 * call's output) and its two RMSNorm weights. */
typedef struct {
    Mat qkv[3], wo, w13[2], w2;
    const float *rms_att, *rms_ffn;
} Layer;

typedef struct {
    int64_t n_layers, dim, hidden_dim, n_heads, kv_heads, head_size;
    float eps;
    const Layer *layers;
    /* what surrounds the layers in a decode step (forward_step) */
    Mat embeddings;          /* (vocab, dim), any type: a token's row is dequantized when it is embedded */
    const float *cos, *sin;  /* RoPE tables (n_positions, head_size / 2) */
    int64_t n_positions;
    Mat cls;                 /* the classifier, (vocab, dim) */
    const float *rms_final;
} Model;

/* Every transformer block for n_tok decode-sized tokens (engine.py's math, in the order of its plain
 * _block), x (n_tok, dim) updated in place; the caller embeds before and applies the classifier after.
 * Per layer: qkv = W·rms(x); attention_step (RoPE, cache writes at each token's slot and position,
 * attention); x += Wo·att; h = W1·rms(x), W3·rms(x); x += W2·(silu(h1) * h3). The cache arrays are
 * (n_layers, n_slots, kv_heads, seq_len) rows of head_size values, fp32, fp16 or Q8_0 as kv_type says. One
 * call per step instead of five per layer: at the sizes where decode is fast, Python's per-call cost would be
 * most of a step. */
static int forward_layers(const Model *m, float *x, int64_t n_tok, const float *cos, const float *sin, void *kc,
                           void *vc, int kv_type, int64_t n_slots, int64_t seq_len, const int64_t *slots,
                           const int64_t *positions, int64_t prefetch) {
    int64_t dim = m->dim, kv_dim = m->kv_heads * m->head_size;
    int64_t layer_cache = n_slots * m->kv_heads * seq_len * kv_row_bytes(kv_type, m->head_size); /* bytes */
    float *qkv = malloc(n_tok * (dim + 2 * kv_dim) * sizeof(float));
    float *att = malloc(n_tok * dim * sizeof(float));
    float *h13 = malloc(2 * n_tok * m->hidden_dim * sizeof(float));
    /* attention splits from ATTENTION_MIN_BYTES where the product before it runs on the pool's threads (which
     * then still spin); a small model's products run on the caller, whose threads may be asleep by then: its
     * attention splits as other work does */
    int64_t qkv_rows = 0;
    for (int j = 0; j < 3; j++) qkv_rows += m->layers[0].qkv[j].rows;
    int64_t attention_min = qkv_rows * dim * n_tok >= PRODUCT_MIN_MACS ? ATTENTION_MIN_BYTES : PARALLEL_MIN_BYTES;
    int overflow = 0;
    for (int64_t l = 0; l < m->n_layers; l++) {
        const Layer *ly = &m->layers[l];
        Fusion norm_att = {ly->rms_att, m->eps, NULL, 0}, norm_ffn = {ly->rms_ffn, m->eps, NULL, 0};
        Fusion residual = {NULL, 0.0f, NULL, 1}, gated = {NULL, 0.0f, h13 + n_tok * m->hidden_dim, 1};
        product(x, n_tok, dim, ly->qkv, 3, qkv, &norm_att, 1, prefetch);
        overflow |= attention_split_from(attention_min, qkv, qkv + n_tok * dim, qkv + n_tok * (dim + kv_dim), cos,
                                         sin, (char *)kc + l * layer_cache, (char *)vc + l * layer_cache, kv_type,
                                         slots, positions, n_tok, m->n_heads, m->kv_heads, seq_len, m->head_size,
                                         att);
        product(att, n_tok, dim, &ly->wo, 1, x, &residual, 1, prefetch);
        product(x, n_tok, dim, ly->w13, 2, h13, &norm_ffn, 1, prefetch);
        product(h13, n_tok, m->hidden_dim, &ly->w2, 1, x, &gated, 1, prefetch);
    }
    free(qkv);
    free(att);
    free(h13);
    return overflow;
}

/* The distance a step of model m prefetches its int8 weights: prefetch_cached where all its matrices (what a
 * step reads) fit in the last-level cache, where they stay from one token to the next; else prefetch_bytes */
static int64_t step_prefetch(const Model *m) {
    int64_t bytes = m->cls.rows * row_bytes(&m->cls, m->dim);
    for (int64_t l = 0; l < m->n_layers; l++) {
        const Layer *ly = &m->layers[l];
        const Mat *mats[7] = {&ly->qkv[0], &ly->qkv[1], &ly->qkv[2], &ly->wo, &ly->w13[0], &ly->w13[1], &ly->w2};
        for (int j = 0; j < 7; j++) bytes += mats[j]->rows * row_bytes(mats[j], j == 6 ? m->hidden_dim : m->dim);
    }
    return bytes <= llc_bytes ? prefetch_cached : prefetch_bytes;
}
int64_t kernel_step_prefetch(const Model *m) { return step_prefetch(m); } /* read by tests */

/* A whole decode-sized step: embed tokens (n_tok,), look up each position's RoPE row, run every layer
 * (forward_layers), then the final RMSNorm and the classifier for the rows out_rows (n_out,) of the step:
 * logits (n_out, vocab). Returns 0, or before touching anything 1-4 when a token id, a position, a slot
 * or an output row lies outside its table (see kernels_native.STEP_ERRORS), or after the step 5 when a key or
 * value overflowed an fp16 cache (see kv_store). */
int forward_step(const Model *m, const int64_t *tokens, int64_t n_tok, const int64_t *slots,
                  const int64_t *positions, void *kc, void *vc, int kv_type, int64_t n_slots, int64_t seq_len,
                  const int64_t *out_rows, int64_t n_out, float *logits) {
    int64_t dim = m->dim, half = m->head_size / 2;
    if (out_of_range(tokens, n_tok, m->embeddings.rows)) return 1;
    if (out_of_range(positions, n_tok, seq_len < m->n_positions ? seq_len : m->n_positions)) return 2;
    if (out_of_range(slots, n_tok, n_slots)) return 3;
    if (out_of_range(out_rows, n_out, n_tok)) return 4;
    atomic_fetch_add_explicit(&steps_begun, 1, memory_order_relaxed);
    float *x = malloc(n_tok * dim * sizeof(float));
    float *cos = malloc(n_tok * half * sizeof(float)), *sin = malloc(n_tok * half * sizeof(float));
    (void)dequantize_rows(&m->embeddings, tokens, n_tok, dim, x); /* the ids were checked above */
    for (int64_t t = 0; t < n_tok; t++) {
        memcpy(cos + t * half, m->cos + positions[t] * half, half * sizeof(float));
        memcpy(sin + t * half, m->sin + positions[t] * half, half * sizeof(float));
    }
    int64_t prefetch = step_prefetch(m);
    int overflow = forward_layers(m, x, n_tok, cos, sin, kc, vc, kv_type, n_slots, seq_len, slots, positions, prefetch);
    float *rows = malloc(n_out * dim * sizeof(float));
    for (int64_t i = 0; i < n_out; i++) memcpy(rows + i * dim, x + out_rows[i] * dim, dim * sizeof(float));
    Fusion final_norm = {m->rms_final, m->eps, NULL, 0};
    product(rows, n_out, dim, &m->cls, 1, logits, &final_norm, 1, prefetch);
    free(x);
    free(cos);
    free(sin);
    free(rows);
    return overflow ? 5 : 0;
}

/* ---------------------------------------------------------------------------- memory bandwidth probe */

typedef struct {
    const uint8_t *p;
    int streams;
    _Atomic uint64_t sum;
} Read;

/* `pages` 4 KiB pages at p read as `streams` interleaved streams, each an equal part of them: a step reads the
 * next READ_STEP bytes of every part in turn. One stream is how a product reads its rows; several read faster on some
 * CPUs (their prefetchers follow each stream, docs/speed.md). */
#if defined(HAVE_AVX512)
#define READ_STEP 256
#elif defined(__AVX2__)
#define READ_STEP 128
#else
#define READ_STEP 8
#endif
#define READ_PAGES 16 /* the pages of a chunk, read as its streams */
static uint64_t read_pages(const uint8_t *p, int64_t pages, int streams) {
    int64_t part = pages * 4096 / streams; /* a multiple of READ_STEP: streams divides 16 */
    uint64_t sum = 0;
#if defined(HAVE_AVX512)
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < part; i += READ_STEP)
        for (int s = 0; s < streams; s++) {
            const uint8_t *q = p + s * part + i;
            a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(q));
            a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(q + 64));
            a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(q + 128));
            a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(q + 192));
        }
    sum = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
#elif defined(__AVX2__)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < part; i += READ_STEP)
        for (int s = 0; s < streams; s++) {
            const uint8_t *q = p + s * part + i;
            a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)q));
            a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(q + 32)));
            a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(q + 64)));
            a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(q + 96)));
        }
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
    sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#else
    for (int64_t i = 0; i < part; i += READ_STEP)
        for (int s = 0; s < streams; s++) {
            uint64_t v;
            memcpy(&v, p + s * part + i, 8);
            sum += v;
        }
#endif
    return sum;
}

static void read_chunk(void *ctx, int64_t lo, int64_t hi) {
    Read *r = ctx;
    uint64_t sum = 0;
    for (int64_t c = lo; c < hi; c += READ_PAGES)
        sum += read_pages(r->p + c * 4096, hi - c < READ_PAGES ? hi - c : READ_PAGES, r->streams);
    atomic_fetch_add(&r->sum, sum);
}

/* Read n_pages 4 KiB pages at p on every configured thread, in chunks of 16 pages, each chunk as `streams` (1, 2,
 * 4, 8 or 16) interleaved streams (what a decode step does with its weights, minus the arithmetic): the bench's
 * memory-bandwidth figure. Returns a checksum, so the reads cannot be skipped; 0 for another stream count. The
 * pool hands out READ_PAGES at a time (one thread: all of them, read READ_PAGES at a time all the same). */
uint64_t read_memory(const void *p, int64_t n_pages, int streams) {
    if (streams < 1 || 16 % streams) return 0;
    Read r = {p, streams, 0};
    pool_run_on(pool.threads, read_chunk, &r, n_pages, READ_PAGES);
    return atomic_load(&r.sum);
}

/* ------------------------------------------------------------------------------------------- sampling */

/* The first index whose running sum of p (fp32, added in order: np.cumsum's values) exceeds `coin`; n - 1 when
 * none does. Sampling's search through the CDF without writing the CDF: NumPy's cumsum takes ~3 ns an element,
 * a sixth of a small model's decode step at 32000 tokens. Plain adds in order, no reassociation (no -ffast-math),
 * so the index is the one np.searchsorted(np.cumsum(p), coin, side="right") finds. */
int64_t first_above(const float *p, int64_t n, float coin) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        sum += p[i];
        if (sum > coin) return i;
    }
    return n > 0 ? n - 1 : 0;
}

typedef struct {
    float p;
    int64_t i;
} Candidate;

/* falling probability, and the lower index first among equal ones: the order of a stable sort */
static int by_falling_probability(const void *a, const void *b) {
    const Candidate *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

/* run.c's top-p sampling as sampler.sample_topp does it in NumPy, with the same fp32 arithmetic: the tokens at
 * or above `cutoff` in falling probability, the nucleus cut after the first whose running mass exceeds topp,
 * then the coin scaled by the nucleus's mass looked up in that running mass; where the most likely token alone
 * holds more than topp, or no token reaches the cutoff, the first most likely one (as sampler.nucleus).
 * Returns the token, or -1 where memory runs out (the caller then takes the NumPy path). NumPy's ~15 calls
 * cost tens of microseconds a token even on small vocabularies, a large share of a small model's decode step
 * (docs/speed.md). */
int64_t sample_topp(const float *probs, int64_t n, float topp, float cutoff, float coin) {
    int64_t m = 0, top = 0;
    for (int64_t i = 0; i < n; i++) {
        m += probs[i] >= cutoff;
        top = probs[i] > probs[top] ? i : top;
    }
    if (m == 0 || probs[top] > topp) return top; /* the nucleus is that token alone: no sort */
    Candidate *c = malloc(m * sizeof(Candidate));
    if (c == NULL) return -1;
    for (int64_t i = 0, k = 0; i < n; i++)
        if (probs[i] >= cutoff) c[k++] = (Candidate){probs[i], i};
    qsort(c, m, sizeof(Candidate), by_falling_probability);
    int64_t last = m - 1;
    float mass = 0.0f;
    for (int64_t k = 0; k < m; k++) {
        mass += c[k].p;
        c[k].p = mass; /* from here on: the running mass */
        if (mass > topp) {
            last = k;
            break;
        }
    }
    float r = coin * c[last].p;
    int64_t k = 0;
    while (k < last && !(c[k].p > r)) k++;
    int64_t token = c[k].i;
    free(c);
    return token;
}

/* The distribution that softmax(logits / temperature) tends to as the temperature goes to 0: all on the first
 * largest logit (the argmax, as sampler.Sampler.sample takes it). */
static void argmax_distribution(const float *logits, int64_t n, float *probs) {
    int64_t top = 0;
    for (int64_t i = 0; i < n; i++) {
        top = logits[i] > logits[top] ? i : top;
        probs[i] = 0.0f;
    }
    probs[top] = 1.0f;
}

/* probs = softmax(logits / temperature) over n values (temperature 1: the logits as they are), as
 * sampler.softmax computes it (the maximum subtracted, each exponential divided by their sum in fp32) but with
 * this file's exponential (exp8; 0 below e^-87, where NumPy's gives a subnormal or 0) and the sum accumulated in
 * fp64 (NumPy's pairwise fp32 sum is as close; a plain fp32 one over 32000 values drifts by 1e-6): the
 * probabilities agree with NumPy's to a few units in the last place, not bit for bit. */
void softmax_logits(const float *logits, int64_t n, double temperature, float *probs) {
    float t = (float)temperature, max = -INFINITY;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        probs[i] = temperature == 1.0 ? logits[i] : logits[i] / t;
        max = probs[i] > max ? probs[i] : max;
    }
    if (!isfinite(max)) { /* logits / temperature left fp32 (a temperature near 0): the limit, as sampler.overflows */
        argmax_distribution(logits, n, probs);
        return;
    }
    int64_t i = 0;
#ifdef __AVX2__
    __m256 vmax = _mm256_set1_ps(max), floor = _mm256_set1_ps(-87.3f);
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_sub_ps(_mm256_loadu_ps(probs + i), vmax);
        __m256 e = _mm256_and_ps(exp8(x), _mm256_cmp_ps(x, floor, _CMP_GE_OQ));
        _mm256_storeu_ps(probs + i, e);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
    sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
    for (; i < n; i++) {
        float x = probs[i] - max;
        probs[i] = x >= -87.3f ? expf(x) : 0.0f;
        sum += probs[i];
    }
    float total = (float)sum;
    for (int64_t j = 0; j < n; j++) probs[j] /= total;
}

/* Sampler.sample for temperature > 0 in one call: run.c's draw from softmax_logits' probabilities with the
 * caller's coin, top-p where 0 < topp < 1 (sample_topp with run.c's cutoff (1 - topp) / (n - 1), as
 * sampler._cutoff), else the whole distribution (first_above). The search is NumPy's exactly; only the
 * probabilities differ in their last bits (softmax_logits), so a coin that falls within that of a boundary
 * between two tokens may pick the other. Returns the token, or -1 where memory could not be allocated. */
int64_t sample_logits(const float *logits, int64_t n, double temperature, double topp, float coin) {
    float *probs = malloc(n * sizeof(float));
    if (probs == NULL) return -1;
    softmax_logits(logits, n, temperature, probs);
    int64_t token;
    if (topp > 0.0 && topp < 1.0) {
        float p = (float)topp;
        token = sample_topp(probs, n, p, (float)((1.0 - (double)p) / (double)(n - 1)), coin);
    } else {
        token = first_above(probs, n, coin);
    }
    free(probs);
    return token;
}
