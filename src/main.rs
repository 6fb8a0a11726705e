//! The `postbox` command: parses arguments and calls into the library.

mod cli;

// mimalloc rather than the system allocator: a worker allocates and frees
// small buffers for every request (headers, bodies, futures), and glibc's
// malloc spent about a sixth of the worker's CPU on them under a drain.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
