//! Strata's drivers (work in progress).
