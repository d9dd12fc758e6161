//! The lab's raw-bytecode programs (`tests::tiny_bpf`) pass the verifier and
//! do what they say, checked with BPF_PROG_TEST_RUN; a link's program can be
//! replaced. Need root.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use tests::ipip::{self, checksum};
use tests::tiny_bpf::{HashMap, Hook, ProgArray, Program, programs};
use tests::{Attachments, Lab, exec, require_root};

const XDP_ABORTED: u32 = 0;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const ETH: [u8; 14] = [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0x08, 0x00];
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 250, 2);
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);

/// A UDP datagram from `src` with a valid IPv4 header (the UDP checksum
/// is 0: none).
fn udp(src: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    let total = 28 + payload_len;
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&[203, 0, 113, 10, 0x30, 0x39, 0, 9]);
    p.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.resize(total, 0xab);
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p
}

fn frame(packet: &[u8]) -> Vec<u8> {
    [&ETH[..], packet].concat()
}

/// Runs `insns` on `input`; returns the verdict and the frame left.
fn run(hook: Hook, insns: &[tests::tiny_bpf::asm::Insn], input: &[u8]) -> (u32, Vec<u8>) {
    require_root().unwrap();
    let prog = Program::load(hook, insns).unwrap();
    let mut out = vec![0; input.len() + 256];
    let r = prog.test_run(input, &mut out).unwrap();
    out.truncate(r.len);
    (r.verdict, out)
}

#[test]
fn transmit_sends_frames_back_untouched() {
    let input = frame(&udp(CLIENT, 18));
    let (verdict, out) = run(Hook::Xdp, &programs::transmit(), &input);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out, input);
}

#[test]
fn mac_swap_swaps_and_transmits() {
    let input = frame(&udp(CLIENT, 18));
    let (verdict, out) = run(Hook::Xdp, &programs::mac_swap(), &input);
    assert_eq!(verdict, XDP_TX);
    assert_eq!((&out[..6], &out[6..12]), (&input[6..12], &input[..6]));
    assert_eq!(out[12..], input[12..]);
}

#[test]
fn flow_lookup_transmits_only_flows_in_its_map() {
    require_root().unwrap();
    let known = frame(&udp(CLIENT, 18));
    let unknown = frame(&udp(LOCAL, 18));
    // CLIENT -> 203.0.113.10, ports 12345 -> 9, UDP; padded to 16 bytes.
    let key = [
        192, 168, 250, 2, 203, 0, 113, 10, 0x30, 0x39, 0, 9, 17, 0, 0, 0,
    ];
    assert_eq!(programs::flow_lookup_key(&known), key);
    let flows = HashMap::new(16, 8, 1024).unwrap();
    flows.insert(&key, &[0; 8]).unwrap();
    let insns = programs::flow_lookup(&flows);

    let (verdict, out) = run(Hook::Xdp, &insns, &known);
    assert_eq!(verdict, XDP_TX);
    assert_eq!((&out[..6], &out[6..12]), (&known[6..12], &known[..6]));
    assert_eq!(out[12..], known[12..]);
    let (verdict, out) = run(Hook::Xdp, &insns, &unknown);
    assert_eq!((verdict, out), (XDP_ABORTED, unknown));
}

#[test]
fn forward_rewrites_the_macs_and_redirects() {
    let input = frame(&udp(CLIENT, 18));
    let (dst, src) = ([0x0a, 0, 0, 0, 0, 1], [0x0a, 0, 0, 0, 0, 2]);
    let (verdict, out) = run(Hook::Xdp, &programs::forward(dst, src, 1), &input);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!((&out[..6], &out[6..12]), (&dst[..], &src[..]));
    assert_eq!(out[12..], input[12..]);
}

#[test]
fn send_frame_writes_the_template() {
    let template = frame(&udp(CLIENT, 19));
    let (verdict, out) = run(
        Hook::Xdp,
        &programs::send_frame(&template),
        &vec![0; template.len()],
    );
    assert_eq!((verdict, out), (XDP_TX, template));
}

#[test]
fn decap_leaves_the_inner_packet() {
    let inner = udp(CLIENT, 18);
    let input = frame(&ipip::encapsulate(&inner, REMOTE, LOCAL, 7).unwrap());
    let (verdict, out) = run(Hook::Xdp, &programs::ipip_decap(), &input);
    assert_eq!((verdict, out), (XDP_PASS, frame(&inner)));
}

#[test]
fn restore_and_call_redoes_the_work_on_every_repeat() {
    require_root().unwrap();
    let inner = udp(CLIENT, 18);
    let input = frame(&ipip::encapsulate(&inner, REMOTE, LOCAL, 7).unwrap());
    let swapped = [&input[6..12], &input[..6], &input[12..]].concat();
    let calls = ProgArray::new().unwrap();
    let restore = Program::load(Hook::Xdp, &programs::restore_and_call(&input, &calls)).unwrap();
    let mut out = vec![0; input.len() + 256];
    let mut twice = || {
        let r = restore.test_run_repeated(&input, &[], 2, &mut out).unwrap();
        (r.verdict, out[..r.len].to_vec())
    };
    assert_eq!(twice().0, XDP_ABORTED, "nothing to call");
    // Two swaps of a frame not put back would leave it as it was.
    let swap = Program::load(Hook::Xdp, &programs::mac_swap()).unwrap();
    calls.set(swap.fd()).unwrap();
    assert_eq!(twice(), (XDP_TX, swapped));
    // The second run finds the head moved by the first.
    let decap = Program::load(Hook::Xdp, &programs::ipip_decap()).unwrap();
    calls.set(decap.fd()).unwrap();
    assert_eq!(twice(), (XDP_PASS, frame(&inner)));
}

#[test]
fn decap_passes_other_packets_untouched() {
    let input = frame(&udp(CLIENT, 18));
    let (verdict, out) = run(Hook::Xdp, &programs::ipip_decap(), &input);
    assert_eq!((verdict, out), (XDP_PASS, input));
}

#[test]
fn encap_adds_a_valid_outer_header() {
    for payload_len in [18, 1000] {
        let inner = udp(CLIENT, payload_len);
        let encap = programs::ipip_encap(CLIENT, LOCAL, REMOTE);
        let (verdict, out) = run(Hook::TcxEgress, &encap, &frame(&inner));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out[..14], ETH);
        let outer = &out[14..];
        assert_eq!(checksum(&outer[..20]), 0, "outer header checksum");
        assert_eq!((outer[8], outer[9]), (64, ipip::IPPROTO_IPIP));
        assert_eq!(
            ipip::decapsulate(outer, REMOTE, LOCAL),
            Ok(Some(&inner[..]))
        );
    }
}

#[test]
fn encap_leaves_other_sources_alone() {
    let input = frame(&udp(LOCAL, 18));
    let encap = programs::ipip_encap(CLIENT, LOCAL, REMOTE);
    let (verdict, out) = run(Hook::TcxEgress, &encap, &input);
    assert_eq!((verdict, out), (TC_ACT_OK, input));
}

#[test]
fn replace_swaps_the_program_a_link_runs() -> anyhow::Result<()> {
    require_root()?;
    let mut lab = Lab::new()?;
    let ns = lab.add_ns("replace")?;
    exec(&ns, "ip link add xa type veth peer name xb")?;
    let link = Program::load(Hook::Xdp, &programs::pass())?.attach(&ns, "xa")?;
    let before = Attachments::of(&ns, "xa")?.xdp;
    Program::load(Hook::Xdp, &programs::drop_all())?.replace(link.as_fd())?;
    let after = Attachments::of(&ns, "xa")?.xdp;
    assert!(before.is_some() && after.is_some(), "{before:?} {after:?}");
    assert_ne!(before, after, "another program runs");
    Ok(())
}
