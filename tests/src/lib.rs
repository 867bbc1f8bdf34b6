//! Cross-crate and interop tests. The tests live in `tests/tests/*.rs`; this
//! library holds what they share (locating QEMU's tools, scratch images).
