//! seccomp filters, one per thread type of the holder process.
