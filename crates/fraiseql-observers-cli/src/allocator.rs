//! The daemon's memory allocator: mimalloc. The engine allocates and frees many small values per
//! event (decoded JSON images, request bodies); with glibc's allocator that was about half of the
//! engine's CPU time in the end-to-end benchmark (see BENCHMARKS.md), with mimalloc a fifth.
//! The library chooses no allocator (it installs no global state); the binary does.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
