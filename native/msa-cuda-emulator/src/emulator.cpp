// msa-cuda's kernels on the CPU: kernels.cu compiled by the host compiler (cuda_host.h supplies the
// built-ins), and a scheduler that runs each block's threads as fibers on the calling OS thread
// (x86-64 Linux: build.rs compiles this file for no other target).
//
// The scheduler runs one thread at a time until it finishes or waits: __syncthreads waits for every
// live thread of the block; a warp shuffle waits for all 32 lanes of its warp, which go on as soon as
// the last arrives. It keeps to one warp while that warp has threads ready, then picks another at
// pseudo-random (the same sequence every run): a warp runs ahead of the others from one barrier to the
// next, as one may on a GPU, so a missing __syncthreads between a write and another warp's read shows.
// The kernels only shuffle with full warps and the full mask, so anything else is reported as the bug
// it would be on a GPU, and a block whose threads all wait but can never be released fails the launch
// with a message instead of hanging.
//
// A GPU faults on accesses a CPU lets pass, so the emulator checks them: every access for its type's
// alignment (a CPU reads a misaligned 16-byte vector without complaint) and every subscript of an
// array variable or member (registers, local and shared memory; not through a pointer), both of which
// fail the launch; and each allocation ends before a page that is never mapped, and is unmapped when
// freed, so an access past its end or after its free faults, naming the kernel.

#include "cuda_host.h"

#include "kernels.cu"
#include "self_test.cu"

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// A fiber switch: saves the callee-saved registers on the current stack and its stack pointer in
// *save, then resumes the stack at `load`. glibc's swapcontext also saves the signal mask, a system
// call per switch, which made emulated kernels ten times slower.
extern "C" void msa_emulator_switch(void** save, void* load);
asm(R"(
    .text
    .globl msa_emulator_switch
    .hidden msa_emulator_switch
    .type msa_emulator_switch, @function
msa_emulator_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size msa_emulator_switch, .-msa_emulator_switch
)");

namespace {

struct Context {
    void* sp = nullptr;
};

// Prepares `context` to start `entry` (which never returns) on the stack [stack, stack + bytes).
void prepare(Context& context, char* stack, size_t bytes, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15);
    void** frame = reinterpret_cast<void**>(top);
    *--frame = nullptr;                          // entry's return address: as after a call, rsp % 16 == 8
    *--frame = reinterpret_cast<void*>(entry);   // where msa_emulator_switch's ret goes
    for (int r = 0; r < 6; r++) *--frame = nullptr;  // rbp, rbx, r12-r15
    context.sp = frame;
}

void switch_context(Context& from, Context& to) { msa_emulator_switch(&from.sp, to.sp); }

}  // namespace

namespace emulator {

namespace {

enum class State { Ready, AtSyncThreads, AtShuffle, Done };

struct Block;

struct Fiber {
    Place place;  // first: the stack's pointer to its fiber is also one to its Place
    Context context;
    State state;
    Block* block;
    size_t index;  // in the block, x fastest
};

// Bytes at the bottom of each stack that hold its fiber's Place pointer, then a page that faults: a
// fiber overflowing its stack crashes instead of overwriting the pointer.
constexpr size_t PAGE = 4096;

struct Stack {
    void operator()(char* p) const {
        mprotect(p + PAGE, PAGE, PROT_READ | PROT_WRITE);
        std::free(p);
    }
};

struct Block {
    static constexpr size_t NONE = ~size_t(0);
    Context scheduler;
    std::vector<Fiber> fibers;
    std::vector<uint64_t> exchange;  // one shuffle slot per thread
    std::vector<std::unique_ptr<char[], Stack>> stacks;
    std::vector<std::vector<size_t>> ready;  // per warp, its threads that may run, in no order
    size_t ready_count = 0, warp = 0;        // warp: the one running
    std::vector<unsigned> shuffling;         // per warp, lanes waiting in a shuffle
    size_t at_barrier = 0, live = 0;
    void (*entry)(void*);
    void* args;
    const char* kernel = nullptr;
    std::string failure;
    size_t running = NONE;  // the thread switched to, while one is
    uint64_t seed = 0x9e3779b97f4a7c15u;

    // xorshift64: the scheduling order.
    uint64_t random() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        return seed;
    }
};

// The stack's pointer is to the fiber's Place, its first member.
Fiber& self() { return *const_cast<Fiber*>(reinterpret_cast<const Fiber*>(&place())); }

void wait(State state) {
    Fiber& f = self();
    f.state = state;
    switch_context(f.context, f.block->scheduler);
}

[[noreturn]] void fiber_main() {
    Block& b = *self().block;
    b.entry(b.args);
    wait(State::Done);
    __builtin_unreachable();  // a finished fiber is never resumed
}

void make_ready(Block& b, size_t t) {
    b.fibers[t].state = State::Ready;
    b.ready[t / 32].push_back(t);
    b.ready_count++;
}

// The next thread to run: one of the running warp's, else of a warp picked at random.
size_t next(Block& b) {
    if (b.ready[b.warp].empty()) {
        size_t skip = b.random() % b.ready_count;
        for (b.warp = 0; skip >= b.ready[b.warp].size(); b.warp++) skip -= b.ready[b.warp].size();
    }
    std::vector<size_t>& lanes = b.ready[b.warp];
    const size_t pick = b.random() % lanes.size(), t = lanes[pick];
    lanes[pick] = lanes.back();
    lanes.pop_back();
    b.ready_count--;
    return t;
}

// Accounts for thread t, which has just waited or finished: releases its warp once all 32 lanes
// shuffle, and the block once every live thread is at __syncthreads (finished ones count as arrived).
void settle(Block& b, size_t t) {
    switch (b.fibers[t].state) {
        case State::AtShuffle: {
            const size_t warp = t / 32;
            if (++b.shuffling[warp] == 32) {
                b.shuffling[warp] = 0;
                for (size_t lane = warp * 32; lane < warp * 32 + 32; lane++) make_ready(b, lane);
            }
            return;
        }
        case State::Done:
            b.live--;
            break;
        case State::AtSyncThreads:
            b.at_barrier++;
            break;
        case State::Ready:
            return;
    }
    if (b.live > 0 && b.at_barrier == b.live) {
        b.at_barrier = 0;
        for (size_t u = 0; u < b.fibers.size(); u++)
            if (b.fibers[u].state == State::AtSyncThreads) make_ready(b, u);
    }
}

// Why a block's threads wait with none ready.
std::string stuck(const Block& b) {
    for (size_t warp = 0; warp < b.shuffling.size(); warp++) {
        if (b.shuffling[warp] == 0) continue;
        const size_t lanes = std::min<size_t>(32, b.fibers.size() - warp * 32);
        size_t done = 0;
        for (size_t t = warp * 32; t < warp * 32 + lanes; t++) done += b.fibers[t].state == State::Done;
        if (lanes < 32 || done > 0)
            return "a warp shuffle in warp " + std::to_string(warp) + " without all 32 lanes (" +
                   std::to_string(lanes - done) + " live)";
    }
    return "a deadlock: " + std::to_string(b.at_barrier) + " of " + std::to_string(b.live) +
           " live threads wait at __syncthreads while others of their warp wait in a shuffle";
}

// Runs block `idx` to the end; false (with b.failure) when it cannot finish.
bool run_block(Block& b, uint3 idx, uint3 block_dim, uint3 grid_dim) {
    const size_t threads = (size_t)block_dim.x * block_dim.y * block_dim.z;
    b.fibers.assign(threads, Fiber{});
    b.exchange.assign(threads, 0);
    b.shuffling.assign((threads + 31) / 32, 0);
    b.ready.assign((threads + 31) / 32, {});
    b.ready_count = 0;
    b.warp = 0;
    b.at_barrier = 0;
    b.live = threads;
    while (b.stacks.size() < threads) {
        // posix_memalign, not aligned_alloc: Clang's alignment check would check what aligned_alloc
        // promises through a handler of UBSan's runtime, which is not linked.
        void* memory = nullptr;
        char* stack = posix_memalign(&memory, STACK_BYTES, STACK_BYTES) == 0 ? static_cast<char*>(memory)
                                                                               : nullptr;
        if (!stack || mprotect(stack + PAGE, PAGE, PROT_NONE) != 0) {
            std::free(stack);
            b.failure = "no memory for fiber stacks";
            return false;
        }
        b.stacks.emplace_back(stack);
    }
    for (size_t t = 0; t < threads; t++) {
        Fiber& f = b.fibers[t];
        uint3 thread{(unsigned)(t % block_dim.x), (unsigned)(t / block_dim.x % block_dim.y),
                     (unsigned)(t / ((size_t)block_dim.x * block_dim.y))};
        f.place = Place{thread, idx, block_dim, grid_dim};
        f.block = &b;
        f.index = t;
        char* stack = b.stacks[t].get();
        *reinterpret_cast<const Place**>(stack) = &f.place;
        // Tops staggered by a cache line per thread: stacks aligned alike would map their hot
        // frames to the same cache sets.
        const size_t stagger = t % 64 * 64;
        prepare(f.context, stack + 2 * PAGE, STACK_BYTES - 2 * PAGE - stagger, fiber_main);
        make_ready(b, t);
    }
    while (b.ready_count > 0 && b.failure.empty()) {
        const size_t t = next(b);
        b.running = t;
        switch_context(b.scheduler, b.fibers[t].context);
        b.running = Block::NONE;
        settle(b, t);
    }
    if (b.failure.empty() && b.live > 0) b.failure = stuck(b);
    return b.failure.empty();
}

}  // namespace

void sync_threads() { wait(State::AtSyncThreads); }

namespace {

// Hands `bits` to the warp, waits for all 32 lanes, and calls read(the warp's 32 slots) before any lane
// goes on.
template <class Read>
void exchange(unsigned mask, uint64_t bits, Read read) {
    Fiber& f = self();
    Block& b = *f.block;
    if (mask != 0xffffffffu) {
        b.failure = "a warp shuffle with a partial mask";
        // Parked for good: the scheduler reports the failure.
        wait(State::AtShuffle);
    }
    const size_t me = f.index;
    b.exchange[me] = bits;
    wait(State::AtShuffle);
    read(&b.exchange[me - me % 32]);
    // Every lane has read before any lane's next shuffle overwrites its slot.
    wait(State::AtShuffle);
}

}  // namespace

uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask) {
    const unsigned source = self().index % 32 ^ (unsigned)lane_mask;
    uint64_t other = bits;
    // A source lane outside the warp gives the thread its own value, as CUDA does.
    exchange(mask, bits, [&](const uint64_t* warp) {
        if (source < 32) other = warp[source];
    });
    return other;
}

void warp_exchange(unsigned mask, uint64_t bits, uint64_t* all) {
    exchange(mask, bits, [&](const uint64_t* warp) { std::memcpy(all, warp, 32 * sizeof(uint64_t)); });
}

namespace {

// The launches running, by OS thread: a failed check or a fault finds its thread's block here. (Not
// a thread-local: the first access to one of a dlopen'ed library may allocate, which a signal handler
// must not, and the initial-exec model, which would not, needs static TLS for every thread-local of
// the library, shared memory included, which dlopen refuses.)
struct Running {
    std::atomic<pid_t> thread{0};
    std::atomic<Block*> block{nullptr};
};
Running RUNNING[256];

pid_t this_thread() { return (pid_t)syscall(SYS_gettid); }

// This thread's launch of `b`, registered until it ends (not at all when every slot is taken: its
// faults then go unnamed).
struct Registration {
    Running* slot = nullptr;
    explicit Registration(Block* b) {
        const pid_t me = this_thread();
        for (Running& r : RUNNING) {
            pid_t free = 0;
            if (r.thread.compare_exchange_strong(free, me)) {
                r.block.store(b);
                slot = &r;
                return;
            }
        }
    }
    ~Registration() {
        if (slot == nullptr) return;
        slot->block.store(nullptr);
        slot->thread.store(0);
    }
};

// The block of the launch this thread runs, if any.
Block* running_block() {
    const pid_t me = this_thread();
    for (Running& r : RUNNING)
        if (r.thread.load() == me) return r.block.load();
    return nullptr;
}

struct sigaction previous_fault_action;

// A fault in a kernel's thread: names the kernel, block and thread, then hands the fault to the
// previous handler (Rust's reports a stack overflow of its own threads), and leaves the default action
// in place, so the access faults again on return and the process ends.
void report_fault(int signal, siginfo_t* info, void* context) {
    const Block* b = running_block();
    if (b != nullptr && b->running != Block::NONE) {
        const Place& at = b->fibers[b->running].place;
        char message[512];
        const int length = std::snprintf(
            message, sizeof message,
            "msa-cuda-emulator: kernel %s, block (%u, %u, %u), thread (%u, %u, %u): an access at %p "
            "faulted: past the end of a device allocation (the page after each is never mapped), in "
            "freed memory or outside device memory, where a GPU fails the launch "
            "(CUDA_ERROR_ILLEGAL_ADDRESS) or reads another allocation; or the thread's stack "
            "overflowed\n",
            b->kernel, at.block.x, at.block.y, at.block.z, at.thread.x, at.thread.y, at.thread.z,
            info->si_addr);
        if (length > 0) (void)!write(STDERR_FILENO, message, std::min<size_t>(length, sizeof message - 1));
    }
    const struct sigaction& previous = previous_fault_action;
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(signal, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(signal);
    }
    struct sigaction fallback = {};
    fallback.sa_handler = SIG_DFL;
    sigemptyset(&fallback.sa_mask);
    sigaction(signal, &fallback, nullptr);
    // A signal sent rather than raised by an access would not come again: send it again.
    if (info->si_code <= 0) raise(signal);
}

}  // namespace

}  // namespace emulator

// Accesses a GPU faults on or computes otherwise, which a CPU would let pass: UBSan's checks of
// alignment and of array bounds (build.rs compiles with -fsanitize=alignment,bounds) call these
// handlers, which the emulator defines rather than link UBSan's runtime. Their arguments are the
// compiler's description of the access, in UBSan's ABI, which GCC and Clang share.
struct SourceLocation {
    const char* file;
    uint32_t line, column;
};
struct TypeDescriptor {
    uint16_t kind, info;  // an integer's info: log2 of its bits, shifted left once, | signed
    char name[1];
};
struct TypeMismatch {
    SourceLocation location;
    const TypeDescriptor* type;
    unsigned char log_alignment, check_kind;
};
struct OutOfBounds {
    SourceLocation location;
    const TypeDescriptor* array;
    const TypeDescriptor* index;
};

namespace {

// In a kernel, the launch fails with `failure`; in the emulator's own code, the process ends with it.
[[noreturn]] void fail(const char* failure) {
    using namespace emulator;
    Block* b = running_block();
    if (b != nullptr && b->running != Block::NONE) {
        b->failure = failure;
        // Parked for good: the scheduler reports the failure.
        wait(State::Done);
    }
    std::fprintf(stderr, "msa-cuda-emulator: %s\n", failure);
    std::abort();
}

// A failed check of the access at `at`.
[[noreturn]] void fail_access(const char* message, const SourceLocation& at) {
    char failure[640];
    std::snprintf(failure, sizeof failure, "%s (%s:%u:%u)", message, at.file, at.line, at.column);
    fail(failure);
}

}  // namespace

void emulator::misaligned_vector(const void* address) {
    char failure[128];
    std::snprintf(failure, sizeof failure, "a 16-byte vector copied from misaligned address %p", address);
    fail(failure);
}

// A misaligned access: a GPU fails the launch with CUDA_ERROR_MISALIGNED_ADDRESS.
extern "C" void __ubsan_handle_type_mismatch_v1(const TypeMismatch* access, uintptr_t address) {
    static const char* const KINDS[] = {"load of", "store to", "reference binding to", "member access within",
                                        "member call on"};
    const char* kind = access->check_kind < 5 ? KINDS[access->check_kind] : "access to";
    char message[512];
    std::snprintf(message, sizeof message,
                  "%s misaligned address %#lx for type %s, which needs %u-byte alignment", kind,
                  (unsigned long)address, access->type->name, 1u << access->log_alignment);
    fail_access(message, access->location);
}

// An index past an array's bounds (registers, local or shared memory): a GPU reads or writes another
// variable's bytes, or faults.
extern "C" void __ubsan_handle_out_of_bounds(const OutOfBounds* access, uintptr_t index) {
    // The index arrives in the handle's low bits; a signed one is shown with its sign.
    const unsigned bits = 1u << (access->index->info >> 1), unused = bits < 64 ? 64 - bits : 0;
    char message[512];
    if (access->index->info & 1) {
        std::snprintf(message, sizeof message, "index %lld out of bounds for type %s",
                      (long long)((int64_t)((uint64_t)index << unused) >> unused), access->array->name);
    } else {
        std::snprintf(message, sizeof message, "index %llu out of bounds for type %s",
                      (unsigned long long)index, access->array->name);
    }
    fail_access(message, access->location);
}

namespace {

// A kernel's arguments copied out of a cuLaunchKernel-style array of pointers to them when the launch
// is queued (as the driver does), and the kernel called with them when it runs.
template <class F>
struct Trampoline;
template <class... A>
struct Trampoline<void (*)(A...)> {
    using Args = std::tuple<A...>;
    template <size_t... I>
    static void* bind_at(void** params, std::index_sequence<I...>) {
        return new Args(*static_cast<A*>(params[I])...);
    }
    static void* bind(void** params) { return bind_at(params, std::index_sequence_for<A...>{}); }
    template <void (*F)(A...)>
    static void run(void* args) {
        std::apply(F, *static_cast<Args*>(args));
    }
    static void unbind(void* args) { delete static_cast<Args*>(args); }
};

struct Kernel {
    const char* name;
    void* (*bind)(void**);
    void (*run)(void*);
    void (*unbind)(void*);
};

#define KERNEL(name)                                                                                    \
    Kernel{#name, &Trampoline<decltype(&name)>::bind, &Trampoline<decltype(&name)>::run<&name>,       \
           &Trampoline<decltype(&name)>::unbind},
// msa-cuda's KERNELS, written by build.rs (a name missing from kernels.cu fails this build), and the
// emulator's own test kernels.
const Kernel KERNELS[] = {
#include "kernel_table.inc"
    KERNEL(self_test_block_sum) KERNEL(self_test_exchange) KERNEL(self_test_partial_warp)
    KERNEL(self_test_divergent_barrier) KERNEL(self_test_missing_barrier) KERNEL(self_test_mma)
    KERNEL(self_test_vector_load) KERNEL(self_test_read)
    KERNEL(self_test_shared_index)
};
#undef KERNEL

}  // namespace

// The kernel named `name`, or null.
extern "C" const void* msa_emulator_kernel(const char* name) {
    for (const Kernel& k : KERNELS)
        if (std::strcmp(k.name, name) == 0) return &k;
    return nullptr;
}

// A copy of `kernel`'s arguments, read from cuLaunchKernel's `params`, for msa_emulator_launch; freed by
// msa_emulator_unbind.
extern "C" void* msa_emulator_bind(const void* kernel, void** params) {
    return static_cast<const Kernel*>(kernel)->bind(params);
}

extern "C" void msa_emulator_unbind(const void* kernel, void* args) {
    static_cast<const Kernel*>(kernel)->unbind(args);
}

// Runs `kernel` over the grid, block by block, with arguments from msa_emulator_bind; 0 on success,
// else 1 with a message in `error`.
extern "C" int msa_emulator_launch(const void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                   unsigned by, unsigned bz, void* args, char* error, size_t error_len) {
    using namespace emulator;
    const Kernel& k = *static_cast<const Kernel*>(kernel);
    // Fiber stacks are kept per OS thread, for the next launch.
    thread_local Block b;
    b.entry = k.run;
    b.args = args;
    b.kernel = k.name;
    const Registration registration(&b);
    const uint3 block_dim{bx, by, bz}, grid_dim{gx, gy, gz};
    for (unsigned z = 0; z < gz; z++)
        for (unsigned y = 0; y < gy; y++)
            for (unsigned x = 0; x < gx; x++) {
                b.failure.clear();
                if (!run_block(b, uint3{x, y, z}, block_dim, grid_dim)) {
                    std::snprintf(error, error_len, "%s, block (%u, %u, %u) of (%u, %u, %u), %u threads: %s",
                                  k.name, x, y, z, gx, gy, gz, bx * by * bz, b.failure.c_str());
                    return 1;
                }
            }
    return 0;
}

namespace {

// The length of the mapping of an allocation of `rounded` bytes: whole pages, the last never mapped.
size_t mapping_length(size_t rounded) {
    using emulator::PAGE;
    return (rounded + PAGE - 1) / PAGE * PAGE + PAGE;
}

}  // namespace

// Device memory (and page-locked host memory) for msa-cuda-emulator's allocations: `rounded` bytes (a
// multiple of 256, the driver's alignment) right before a page that is never mapped, so that a kernel
// reading or writing past an allocation faults there (report_fault names it), as does one touching it
// once freed (unmapped). Null, with the reason printed, when the mapping fails.
extern "C" void* msa_emulator_map(size_t rounded) {
    using namespace emulator;
    static std::once_flag installed;
    std::call_once(installed, [] {
        struct sigaction action = {};
        action.sa_sigaction = report_fault;
        action.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&action.sa_mask);
        sigaction(SIGSEGV, &action, &previous_fault_action);
    });
    if (rounded > SIZE_MAX / 2) return nullptr;
    const size_t length = mapping_length(rounded);
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char* guard = base == MAP_FAILED ? nullptr : static_cast<char*>(base) + length - PAGE;
    if (guard == nullptr || mprotect(guard, PAGE, PROT_NONE) != 0) {
        // Each allocation is two mappings: a process may have vm.max_map_count of them.
        std::fprintf(stderr, "msa-cuda-emulator: mapping %zu bytes failed: %s\n", rounded,
                     std::strerror(errno));
        if (guard != nullptr) munmap(base, length);
        return nullptr;
    }
    return guard - rounded;
}

// Unmaps an allocation of `rounded` bytes from msa_emulator_map.
extern "C" void msa_emulator_unmap(void* ptr, size_t rounded) {
    const size_t length = mapping_length(rounded);
    munmap(static_cast<char*>(ptr) + rounded + emulator::PAGE - length, length);
}
