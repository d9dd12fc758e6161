//! The programs themselves. Each loads with `Program::load` on its hook.

use super::asm::{Asm, Insn, R0, R1, R2, R3, R4, R5, R6, R7, R10, Reg, Size};
use super::{HashMap, ProgArray};
use crate::ipip;
use std::net::Ipv4Addr;

const XDP_ABORTED: i32 = 0;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_TAIL_CALL: i32 = 12;
const BPF_FUNC_REDIRECT: i32 = 23;
const BPF_FUNC_XDP_ADJUST_HEAD: i32 = 44;
const BPF_FUNC_SKB_ADJUST_ROOM: i32 = 50;
const BPF_ADJ_ROOM_MAC: i32 = 1;
const BPF_F_ADJ_ROOM_FIXED_GSO: i32 = 1 << 0;
const BPF_F_ADJ_ROOM_ENCAP_L3_IPV4: i32 = 1 << 1;
/// `struct __sk_buff` offsets.
const SKB_LEN: i16 = 0;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
/// `struct xdp_md` offsets.
const XDP_DATA: i16 = 0;
const XDP_DATA_END: i16 = 4;
const ETH_LEN: i16 = 14;
const IP_LEN: i16 = 20;
/// Offsets in an Ethernet frame carrying IPv4.
const ETHERTYPE: i16 = 12;
const IP_PROTO: i16 = ETH_LEN + 9;
const IP_SRC: i16 = ETH_LEN + 12;
/// ETH_P_IP as a little-endian load of the big-endian field sees it.
const ETH_P_IP_LE: i32 = 0x0008;

fn verdict(verdict: i32) -> Vec<Insn> {
    Asm::default().mov_imm(R0, verdict).finish()
}

/// XDP: passes everything to the stack.
pub fn pass() -> Vec<Insn> {
    verdict(XDP_PASS)
}

/// XDP: drops everything; a sink that costs the receiver next to nothing.
pub fn drop_all() -> Vec<Insn> {
    verdict(XDP_DROP)
}

/// XDP: transmits every frame untouched. Timed by BPF_PROG_TEST_RUN it
/// shows what the timing itself costs: the kernel's clock reads and its
/// loop around the program.
pub fn transmit() -> Vec<Insn> {
    verdict(XDP_TX)
}

/// XDP: swaps the Ethernet addresses and sends the frame back out, the
/// least any forwarding program does: the floor for per-packet cost.
pub fn mac_swap() -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_imm(R0, XDP_DROP)
        .load(Size::W, R2, R1, XDP_DATA)
        .load(Size::W, R3, R1, XDP_DATA_END)
        .exit_if_shorter(R2, R3, ETH_LEN.into(), R4);
    swap_and_transmit(&mut a, R2);
    a.finish()
}

/// XDP: [`mac_swap`] once the frame's flow (IPv4 source and destination,
/// the 4 bytes after a 20-byte header, protocol, zero-padded to 16 bytes)
/// is found in `flows`, a hash map with 16-byte keys; the floor of a
/// translator that looks up one flow per packet. Drops frames too short
/// for it, `XDP_ABORTED` for a flow not in the map.
pub fn flow_lookup(flows: &HashMap) -> Vec<Insn> {
    const KEY: i16 = -16;
    let mut a = Asm::default();
    a.mov_imm(R0, XDP_DROP)
        .load(Size::W, R6, R1, XDP_DATA)
        .load(Size::W, R3, R1, XDP_DATA_END)
        .exit_if_shorter(R6, R3, (ETH_LEN + IP_LEN + 4).into(), R4)
        .load(Size::W, R4, R6, IP_SRC)
        .store(Size::W, R10, KEY, R4)
        .load(Size::W, R4, R6, IP_SRC + 4)
        .store(Size::W, R10, KEY + 4, R4)
        .load(Size::W, R4, R6, ETH_LEN + IP_LEN)
        .store(Size::W, R10, KEY + 8, R4)
        .load(Size::B, R4, R6, IP_PROTO)
        .store(Size::W, R10, KEY + 12, R4)
        .load_map(R1, flows.fd())
        .mov(R2, R10)
        .add_imm(R2, KEY.into())
        .call(BPF_FUNC_MAP_LOOKUP_ELEM)
        .exit_if_zero(R0);
    swap_and_transmit(&mut a, R6);
    a.finish()
}

/// The key [`flow_lookup`] looks up for `frame`.
pub fn flow_lookup_key(frame: &[u8]) -> [u8; 16] {
    let (src, l4) = (IP_SRC as usize, (ETH_LEN + IP_LEN) as usize);
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&frame[src..src + 8]);
    key[8..12].copy_from_slice(&frame[l4..l4 + 4]);
    key[12] = frame[IP_PROTO as usize];
    key
}

/// XDP, for BPF_PROG_TEST_RUN's repeat over one packet: puts the packet
/// back as `frame` (its length first, by moving its head) and tail-calls
/// `next`'s program. So every repeat of a program that rewrites packets in
/// place, or moves their head (decapsulation, encapsulation), redoes the
/// work on the frame. `XDP_ABORTED` if the packet cannot be put back or
/// the tail call fails; `XDP_DROP` for a packet shorter than `frame`.
pub fn restore_and_call(frame: &[u8], next: &ProgArray) -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov(R6, R1)
        .mov_imm(R0, XDP_ABORTED)
        .load(Size::W, R2, R6, XDP_DATA)
        .load(Size::W, R3, R6, XDP_DATA_END)
        // The head moves by the packet's length less the frame's.
        .sub(R3, R2)
        .add_imm(R3, -(frame.len() as i32))
        .mov(R1, R6)
        .mov(R2, R3)
        .call(BPF_FUNC_XDP_ADJUST_HEAD)
        .mov(R7, R0)
        .mov_imm(R0, XDP_ABORTED)
        .exit_if_nonzero(R7)
        .mov_imm(R0, XDP_DROP)
        .load(Size::W, R2, R6, XDP_DATA)
        .load(Size::W, R3, R6, XDP_DATA_END)
        .exit_if_shorter(R2, R3, frame.len() as i32, R4)
        .store_bytes(R2, 0, frame)
        .mov(R1, R6)
        .load_map(R2, next.fd())
        .mov_imm(R3, 0)
        .call(BPF_FUNC_TAIL_CALL)
        .mov_imm(R0, XDP_ABORTED);
    a.finish()
}

/// Swaps the Ethernet addresses of the frame at `data` (14 bytes checked)
/// and returns `XDP_TX`.
fn swap_and_transmit(a: &mut Asm, data: Reg) {
    a.load(Size::W, R4, data, 0)
        .load(Size::H, R5, data, 4)
        .load(Size::W, R1, data, 6)
        .load(Size::H, R3, data, 10)
        .store(Size::W, data, 0, R1)
        .store(Size::H, data, 4, R3)
        .store(Size::W, data, 6, R4)
        .store(Size::H, data, 10, R5)
        .mov_imm(R0, XDP_TX);
}

/// XDP: a static switch port: every frame gets Ethernet destination `dst`
/// and source `src` and leaves by interface `ifindex` (`XDP_REDIRECT`).
/// No lookup and no TTL decrement: the least a forwarder does.
pub fn forward(dst: [u8; 6], src: [u8; 6], ifindex: u32) -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_imm(R0, XDP_DROP)
        .load(Size::W, R2, R1, XDP_DATA)
        .load(Size::W, R3, R1, XDP_DATA_END)
        .exit_if_shorter(R2, R3, ETH_LEN.into(), R4)
        .store_bytes(R2, 0, &[dst, src].concat())
        .mov_imm(R1, ifindex as i32)
        .mov_imm(R2, 0)
        .call(BPF_FUNC_REDIRECT);
    a.finish()
}

/// XDP, for BPF_PROG_TEST_RUN's live-frames mode: writes `frame` over the
/// packet and transmits it. Rewriting matters: the kernel recycles the
/// pages of transmitted frames without restoring their contents, and the
/// hops downstream (router, gateway) rewrite headers in place.
pub fn send_frame(frame: &[u8]) -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_imm(R0, XDP_DROP)
        .load(Size::W, R2, R1, XDP_DATA)
        .load(Size::W, R3, R1, XDP_DATA_END)
        .exit_if_shorter(R2, R3, frame.len() as i32, R4)
        .store_bytes(R2, 0, frame)
        .mov_imm(R0, XDP_TX);
    a.finish()
}

/// XDP: strips the outer header of IP-in-IP frames (RFC 2003, no options)
/// and passes the inner packet to the stack; passes anything else as is.
pub fn ipip_decap() -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_imm(R0, XDP_PASS)
        .load(Size::W, R2, R1, XDP_DATA)
        .load(Size::W, R3, R1, XDP_DATA_END)
        .exit_if_shorter(R2, R3, (ETH_LEN + IP_LEN).into(), R4)
        .load(Size::H, R4, R2, ETHERTYPE)
        .exit_if_ne32(R4, ETH_P_IP_LE)
        .load(Size::B, R4, R2, IP_PROTO)
        .exit_if_ne32(R4, ipip::IPPROTO_IPIP.into())
        // The MAC addresses move forward over the outer header.
        .load(Size::DW, R4, R2, 0)
        .store(Size::DW, R2, IP_LEN, R4)
        .load(Size::W, R4, R2, 8)
        .store(Size::W, R2, IP_LEN + 8, R4)
        .store_imm(Size::H, R2, IP_LEN + ETHERTYPE, ETH_P_IP_LE)
        .mov_imm(R2, IP_LEN.into())
        .call(BPF_FUNC_XDP_ADJUST_HEAD)
        .mov_imm(R0, XDP_PASS);
    a.finish()
}

/// tcx egress: IPv4 packets from `inner_src` leave encapsulated from
/// `local` to `remote` (outer TTL 64, DF, TOS 0). GSO packets are marked
/// as IP-in-IP so the kernel segments them with both headers.
pub fn ipip_encap(inner_src: Ipv4Addr, local: Ipv4Addr, remote: Ipv4Addr) -> Vec<Insn> {
    // The header ipip-peer would write, with length and checksum zero: its
    // one's complement sum plus the length is the checksum to come.
    let probe = [
        0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut outer = ipip::encapsulate(&probe, local, remote, 0).expect("valid probe");
    outer.truncate(IP_LEN as usize);
    outer[2..4].fill(0);
    outer[10..12].fill(0);
    let partial_sum = i32::from(!ipip::checksum(&outer));

    let mut a = Asm::default();
    a.mov(R6, R1)
        .mov_imm(R0, TC_ACT_OK)
        .load(Size::W, R2, R6, SKB_DATA)
        .load(Size::W, R3, R6, SKB_DATA_END)
        .exit_if_shorter(R2, R3, (ETH_LEN + IP_LEN).into(), R4)
        .load(Size::H, R4, R2, ETHERTYPE)
        .exit_if_ne32(R4, ETH_P_IP_LE)
        .load(Size::W, R4, R2, IP_SRC)
        .exit_if_ne32(R4, i32::from_le_bytes(inner_src.octets()))
        .mov(R1, R6)
        .mov_imm(R2, IP_LEN.into())
        .mov_imm(R3, BPF_ADJ_ROOM_MAC)
        .mov_imm(R4, BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)
        .call(BPF_FUNC_SKB_ADJUST_ROOM)
        .mov(R7, R0)
        .mov_imm(R0, TC_ACT_SHOT)
        .exit_if_nonzero(R7)
        .load(Size::W, R2, R6, SKB_DATA)
        .load(Size::W, R3, R6, SKB_DATA_END)
        .exit_if_shorter(R2, R3, (ETH_LEN + IP_LEN).into(), R4)
        .store_bytes(R2, ETH_LEN, &outer)
        // total length = skb->len - Ethernet header
        .load(Size::W, R4, R6, SKB_LEN)
        .add_imm(R4, -i32::from(ETH_LEN))
        // checksum = ~fold(partial_sum + total length); both below 2^16,
        // so one fold suffices.
        .mov(R5, R4)
        .add_imm(R5, partial_sum)
        .mov(R7, R5)
        .rsh_imm(R7, 16)
        .and_imm(R5, 0xffff)
        .add(R5, R7)
        .xor_imm(R5, 0xffff)
        .be16(R5)
        .store(Size::H, R2, ETH_LEN + 10, R5)
        .be16(R4)
        .store(Size::H, R2, ETH_LEN + 2, R4)
        .mov_imm(R0, TC_ACT_OK);
    a.finish()
}
