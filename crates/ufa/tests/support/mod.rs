//! Helpers shared by integration tests (each test binary includes what it uses).
#![allow(dead_code)]

pub mod cuda_memory;
