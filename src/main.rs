//! The `postbox` command: parses arguments and calls into the library.

mod cli;

// mimalloc rather than the system allocator: a worker allocates and frees
// small buffers for every request (headers, bodies, futures), and glibc's
// malloc spent about a sixth of the worker's CPU on them under a drain.
// Built without transparent huge pages (feature `no_thp`): asked for them,
// each first touch of a 2 MiB region was zeroed whole, 5–8 % of a worker's
// CPU in a drain, for a process whose heap is a few tens of MiB (peak RSS
// 36–40 MiB with them, 23–25 MiB without).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
