//! TCP MSS clamping: SYN and SYN-ACK announce at most what fits the
//! tunnel, in both directions; everything else about a segment's options
//! is left as it was.

use egress_common::tcp::{ACK, SYN};

use super::*;

for_each_hook!(
    syn_and_syn_ack_are_clamped_both_ways,
    an_mss_at_an_odd_offset_is_clamped,
    small_missing_or_malformed_mss_and_non_syn_segments_are_left_alone,
    clamping_can_be_turned_off,
);

/// Options as Linux puts them in a SYN: MSS `mss`, SACK permitted,
/// timestamps, NOP, window scale.
fn linux_options(mss: u16) -> [u8; 20] {
    let [hi, lo] = mss.to_be_bytes();
    [
        2, 4, hi, lo, 4, 2, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0, 0, 1, 3, 3, 7,
    ]
}

/// The client's SYN (or the server's SYN-ACK with `flags`) to or from
/// port 80 with `options`.
fn out_syn(sport: u16, flags: u8, options: &[u8]) -> L4<'_> {
    L4::with_options(sport, 80, flags, options)
}

fn back_syn(dport: u16, flags: u8, options: &[u8]) -> L4<'_> {
    L4::with_options(80, dport, flags, options)
}

fn syn_and_syn_ack_are_clamped_both_ways(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let clamped = linux_options(MSS);
    // 1460: an Ethernet host's; 65495: a loopback-sized one.
    for (port, mss) in [(23456, 1460), (23457, 65495)] {
        let sent = linux_options(mss);
        let syn = out_syn(port, SYN, &sent);
        let want = out_syn(port, SYN, &clamped);
        assert_eq!(
            outbound_as(gw, CLIENT, SERVER, syn, want, Reason::NewFlow),
            port
        );
        let syn_ack = back_syn(port, SYN | ACK, &sent);
        inbound(gw, syn_ack, CLIENT, back_syn(port, SYN | ACK, &clamped));
    }
}

fn an_mss_at_an_odd_offset_is_clamped(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let [hi, lo] = MSS.to_be_bytes();
    // A NOP first: the MSS value straddles two checksum words.
    let sent = [1, 2, 4, 0x23, 0x28, 1, 1, 1];
    let clamped = [1, 2, 4, hi, lo, 1, 1, 1];
    let syn = out_syn(23456, SYN, &sent);
    outbound_as(
        gw,
        CLIENT,
        SERVER,
        syn,
        out_syn(23456, SYN, &clamped),
        Reason::NewFlow,
    );
    inbound(
        gw,
        back_syn(23456, SYN | ACK, &sent),
        CLIENT,
        back_syn(23456, SYN | ACK, &clamped),
    );
}

fn small_missing_or_malformed_mss_and_non_syn_segments_are_left_alone(hook: Hook) {
    let gw = &mut Gateway::new(hook);
    let large = linux_options(1460);
    let cases: [(&str, u8, &[u8]); 6] = [
        ("MSS below the clamp", SYN, &linux_options(1200)),
        ("MSS at the clamp", SYN, &linux_options(MSS)),
        ("no MSS option", SYN, &[1, 1, 4, 2]),
        (
            "a zero option length first",
            SYN,
            &[3, 0, 2, 4, 5, 0xb4, 0, 0],
        ),
        ("an MSS option of length 3", SYN, &[2, 3, 5, 0xb4]),
        ("not a SYN", ACK, &large),
    ];
    for (i, (what, flags, options)) in cases.into_iter().enumerate() {
        let port = 23000 + i as u16;
        let l4 = out_syn(port, flags, options);
        assert_eq!(outbound(gw, CLIENT, l4, Reason::NewFlow), port, "{what}");
        let back = back_syn(port, flags | ACK, options);
        inbound(gw, back, CLIENT, back);
    }
}

fn clamping_can_be_turned_off(hook: Hook) {
    let gw = &mut Gateway::with(hook, |p| p.mss = 0);
    let options = linux_options(9000);
    outbound(gw, CLIENT, out_syn(23456, SYN, &options), Reason::NewFlow);
    let syn_ack = back_syn(23456, SYN | ACK, &options);
    inbound(gw, syn_ack, CLIENT, syn_ack);
}
