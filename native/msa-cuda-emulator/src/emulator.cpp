// msa-cuda's kernels on the CPU: kernels.cu compiled by the host compiler (cuda_host.h supplies the
// built-ins), and a scheduler that runs each block's threads as fibers on the calling OS thread
// (x86-64 Linux: build.rs compiles this file for no other target).
//
// A fiber runs until it finishes or reaches a barrier: __syncthreads waits for every live thread of the
// block; a warp shuffle waits for all 32 lanes of its warp (the kernels only shuffle with full warps
// and the full mask, so anything else is reported as the bug it would be on a GPU). A block whose
// fibers all wait but can never be released (threads of one warp at different barriers) fails the
// launch with a message instead of hanging.

#include "cuda_host.h"

#include "kernels.cu"
#include "self_test.cu"

#include <cstdio>
#include <cstdlib>
#include <sys/mman.h>
#include <memory>
#include <string>
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
    Context scheduler;
    std::vector<Fiber> fibers;
    std::vector<uint64_t> exchange;  // one shuffle slot per thread
    std::vector<std::unique_ptr<char[], Stack>> stacks;
    void (*entry)(void**);
    void** params;
    std::string failure;
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
    b.entry(b.params);
    wait(State::Done);
    __builtin_unreachable();  // a finished fiber is never resumed
}

unsigned linear(const Place& p) {
    return p.thread.x + p.block_dim.x * (p.thread.y + p.block_dim.y * p.thread.z);
}

// Releases the threads that may go on; false when none can (a deadlock, or every thread done).
bool release(Block& b) {
    if (!b.failure.empty()) return false;
    const size_t threads = b.fibers.size();
    bool released = false;
    for (size_t warp = 0; warp < threads; warp += 32) {
        const size_t end = std::min(warp + 32, threads);
        size_t shuffling = 0, done = 0;
        for (size_t t = warp; t < end; t++) {
            shuffling += b.fibers[t].state == State::AtShuffle;
            done += b.fibers[t].state == State::Done;
        }
        if (shuffling == 0) continue;
        if (end - warp < 32 || done > 0) {
            b.failure = "a warp shuffle in warp " + std::to_string(warp / 32) +
                        " without all 32 lanes (" + std::to_string(end - warp - done) + " live)";
            return false;
        }
        if (shuffling == 32) {
            for (size_t t = warp; t < end; t++) b.fibers[t].state = State::Ready;
            released = true;
        }
    }
    if (released) return true;
    size_t waiting = 0, live = 0;
    for (const Fiber& f : b.fibers) {
        live += f.state != State::Done;
        waiting += f.state == State::AtSyncThreads;
    }
    if (live == 0) return false;
    if (waiting == live) {
        for (Fiber& f : b.fibers)
            if (f.state == State::AtSyncThreads) f.state = State::Ready;
        return true;
    }
    b.failure = "a deadlock: " + std::to_string(waiting) + " of " + std::to_string(live) +
                " live threads wait at __syncthreads while others of their warp wait in a shuffle";
    return false;
}

// Runs block `idx` to the end; false (with b.failure) when it cannot finish.
bool run_block(Block& b, uint3 idx, uint3 block_dim, uint3 grid_dim) {
    const size_t threads = (size_t)block_dim.x * block_dim.y * block_dim.z;
    b.fibers.assign(threads, Fiber{});
    b.exchange.assign(threads, 0);
    while (b.stacks.size() < threads) {
        char* stack = static_cast<char*>(std::aligned_alloc(STACK_BYTES, STACK_BYTES));
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
        f.state = State::Ready;
        f.block = &b;
        char* stack = b.stacks[t].get();
        *reinterpret_cast<const Place**>(stack) = &f.place;
        // Tops staggered by a cache line per thread: stacks aligned alike would map their hot
        // frames to the same cache sets.
        const size_t stagger = t % 64 * 64;
        prepare(f.context, stack + 2 * PAGE, STACK_BYTES - 2 * PAGE - stagger, fiber_main);
    }
    // Each pass runs the ready threads in a new pseudo-random order (the same every run), each until
    // it waits: in index order, a thread would always have written before a higher one reads, and a
    // missing barrier would go unnoticed.
    std::vector<size_t> order(threads);
    for (size_t t = 0; t < threads; t++) order[t] = t;
    for (;;) {
        for (size_t t = threads; t > 1; t--) std::swap(order[t - 1], order[b.random() % t]);
        for (size_t t : order)
            if (b.fibers[t].state == State::Ready) switch_context(b.scheduler, b.fibers[t].context);
        if (!release(b)) return b.failure.empty();
    }
}

}  // namespace

void sync_threads() { wait(State::AtSyncThreads); }

uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask) {
    Fiber& f = self();
    Block& b = *f.block;
    if (mask != 0xffffffffu) {
        b.failure = "a warp shuffle with a partial mask";
        // Parked for good: the scheduler reports the failure.
        wait(State::AtShuffle);
    }
    const unsigned me = linear(f.place), lane = me % 32, source = lane ^ (unsigned)lane_mask;
    b.exchange[me] = bits;
    wait(State::AtShuffle);
    // A source lane outside the warp gives the thread its own value, as CUDA does.
    const uint64_t other = source < 32 ? b.exchange[me - lane + source] : bits;
    // Every lane has read before any lane's next shuffle overwrites its slot.
    wait(State::AtShuffle);
    return other;
}

}  // namespace emulator

namespace {

// Calls a kernel with its arguments read from a cuLaunchKernel-style array of pointers to them.
template <class F>
struct Trampoline;
template <class... A>
struct Trampoline<void (*)(A...)> {
    template <void (*F)(A...), size_t... I>
    static void call(void** params, std::index_sequence<I...>) {
        F(*static_cast<A*>(params[I])...);
    }
    template <void (*F)(A...)>
    static void run(void** params) {
        call<F>(params, std::index_sequence_for<A...>{});
    }
};

struct Kernel {
    const char* name;
    void (*run)(void**);
};

#define KERNEL(name) Kernel{#name, &Trampoline<decltype(&name)>::run<&name>},
// msa-cuda's KERNELS, written by build.rs (a name missing from kernels.cu fails this build), and the
// emulator's own test kernels.
const Kernel KERNELS[] = {
#include "kernel_table.inc"
    KERNEL(self_test_block_sum) KERNEL(self_test_exchange) KERNEL(self_test_partial_warp)
    KERNEL(self_test_divergent_barrier)
};
#undef KERNEL

}  // namespace

// The kernel named `name`, or null.
extern "C" const void* msa_emulator_kernel(const char* name) {
    for (const Kernel& k : KERNELS)
        if (std::strcmp(k.name, name) == 0) return &k;
    return nullptr;
}

// Runs `kernel` over the grid, block by block; 0 on success, else 1 with a message in `error`.
extern "C" int msa_emulator_launch(const void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                   unsigned by, unsigned bz, void** params, char* error, size_t error_len) {
    using namespace emulator;
    const Kernel& k = *static_cast<const Kernel*>(kernel);
    // Fiber stacks are kept per OS thread, for the next launch.
    thread_local Block b;
    b.entry = k.run;
    b.params = params;
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
