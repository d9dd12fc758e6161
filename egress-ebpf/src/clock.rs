//! The clock flows, mappings and fragments are stamped with:
//! CLOCK_MONOTONIC as of the last tick (`bpf_ktime_get_coarse_ns`), fine for
//! idle timeouts and what the daemon compares against.
//!
//! Reading it costs a helper call, which measured 25–30 ns per packet on an
//! AMD host (every return pays for the SRSO mitigation): a fifth of an
//! established packet. It only changes once a tick, and the tick counter is
//! a plain load (the verifier inlines `bpf_jiffies64`), so each CPU reads
//! the clock once per tick and reuses the reading.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::PerCpuArray,
};

/// This CPU's last reading: `[tick, ns]`.
#[map]
static LAST_READING: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// The tick counter (`jiffies`).
#[inline(always)]
pub fn tick() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_jiffies64() }
}

/// CLOCK_MONOTONIC as of the last tick, in ns.
#[inline(always)]
pub fn now() -> u64 {
    let tick = tick();
    let Some(last) = LAST_READING.get_ptr_mut(0) else {
        return coarse();
    };
    // SAFETY: this CPU's slot; programs do not nest on a CPU.
    let [last_tick, ns] = unsafe { &mut *last };
    if *last_tick != tick {
        // The jiffy may tick a moment before the clock does: then this
        // reading is a tick behind, as a coarse reading can be anyway.
        *ns = coarse();
        *last_tick = tick;
    }
    *ns
}

#[inline(always)]
fn coarse() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}
