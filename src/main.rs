//! The `refiner-gateway` binary: the command line is in [`refiner_gateway::cli`].

use std::process::ExitCode;

/// mimalloc instead of the system allocator: delivery allocates per call (requests,
/// answers, JSON), and glibc's malloc and free took about a sixth of the dispatch
/// threads' time; measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    refiner_gateway::cli::main()
}
