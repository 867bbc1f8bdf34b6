//! Benchmarks for Strata: criterion micro-benchmarks of hot paths live in
//! `benches/`, and `run-vs-qemu.py` runs `strata-img bench` beside
//! `qemu-img bench` and reports ratios.
