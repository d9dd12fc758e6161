//! The gateway's data path: XDP and TC entry points over the
//! hook-independent translation in `nat`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

/// The modules, compiled for the BPF target only.
macro_rules! bpf_modules {
    ($($name:ident),* $(,)?) => {
        $(
            #[cfg(target_arch = "bpf")]
            mod $name;
        )*
    };
}

bpf_modules!(
    clock, fib, flow_cache, frag, icmp, inbound, l4, maps, mss, nat, outbound, packet, relay,
    state, tc, xdp,
);

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}

/// Host builds compile nothing: the logic that is testable on the host lives
/// in `egress-common`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
