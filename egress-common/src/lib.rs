//! Types and pure logic shared by the eBPF programs and the userspace daemon.
//!
//! Everything here is `no_std`, free of kernel helpers and therefore testable
//! (and fuzzable) on the host. Addresses and ports are stored as big-endian
//! byte arrays exactly as they appear on the wire, so endianness cannot go
//! wrong between kernel and user side.
#![cfg_attr(not(test), no_std)]

pub mod checksum;
pub mod config;
pub mod ecn;
pub mod flow;
pub mod flow_cache;
pub mod fragment;
pub mod headers;
pub mod ip_id;
pub mod mss;
pub mod peers;
pub mod ports;
pub mod reason;
pub mod rewrite;
pub mod route;
pub mod state_format;
pub mod tcp;
