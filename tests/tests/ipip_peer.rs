//! The emulator checked against itself: two namespaces, each with a TUN
//! device and an `ipip-peer` pointing at the other, joined by one veth. What
//! crosses proves encapsulation, decapsulation and header fields are right,
//! independently of the gateway.

use anyhow::{Context, Result, ensure};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;
use tests::addrs::{HOST_IFACE, HTTP_PORT};
use tests::echo::{udp_request, udp_server};
use tests::ipip::{IPPROTO_IPIP, checksum};
use tests::topology::{add_tun, large_page, start_http_server, start_ipip_peer, veth_link};
use tests::{Lab, exec, in_netns, require_root};

const A_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const B_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 11);
const A_TUN: Ipv4Addr = Ipv4Addr::new(192, 168, 250, 2);
const B_TUN: Ipv4Addr = Ipv4Addr::new(192, 168, 250, 1);
const UDP_PORT: u16 = 9000;
/// ICMP payload that fills a 1480-byte inner datagram, the TUN MTU.
const FULL_SIZE_PING: usize = 1480 - 20 - 8;

#[test]
fn ipip_peer_back_to_back() -> Result<()> {
    require_root()?;
    let mut lab = Lab::new()?;
    let a = lab.add_ns("a")?;
    let b = lab.add_ns("b")?;
    veth_link(&a, HOST_IFACE, A_UNDERLAY, &b, B_UNDERLAY)?;
    add_tun(&a, A_TUN, 30)?;
    add_tun(&b, B_TUN, 30)?;
    let bin = Path::new(env!("CARGO_BIN_EXE_ipip-peer"));
    let _peer_a = start_ipip_peer(&lab, &a, bin, A_UNDERLAY, B_UNDERLAY)?;
    let _peer_b = start_ipip_peer(&lab, &b, bin, B_UNDERLAY, A_UNDERLAY)?;
    lab.keep_logs_on_err(across(&lab, &a, &b))
}

/// Ping (sizes up to the TUN MTU), UDP and HTTP from `a` to `b`.
fn across(lab: &Lab, a: &str, b: &str) -> Result<()> {
    let out = exec(a, &format!("ping -c 3 -W 2 {B_TUN}"))?;
    ensure!(out.contains("3 received"), "{out}");

    outer_headers_copy_df_and_tos(a, b)?;

    let _udp = udp_server(b, SocketAddr::from((B_TUN, UDP_PORT)))?;
    let reply = udp_request(a, A_TUN, (B_TUN, UDP_PORT).into(), b"over the tunnel")?;
    ensure!(reply.seen.ip() == A_TUN, "server saw {}", reply.seen);
    ensure!(reply.body == b"over the tunnel");

    // Many full-sized TCP segments, both ways of the tunnel.
    let www = lab.dir().join("www");
    std::fs::create_dir(&www)?;
    let content = large_page();
    std::fs::write(www.join("big.txt"), &content)?;
    let _http = start_http_server(lab, b, B_TUN, &www)?;
    let got = exec(
        a,
        &format!("curl -sS --max-time 20 http://{B_TUN}:{HTTP_PORT}/big.txt"),
    )?;
    ensure!(
        got == content,
        "got {} bytes, expected {}",
        got.len(),
        content.len()
    );
    Ok(())
}

/// Captures in `b`, beside its emulator, the outer headers of two pings from
/// `a`: one full-sized with DF and TOS 0x10, one small without DF.
fn outer_headers_copy_df_and_tos(a: &str, b: &str) -> Result<()> {
    let capture = in_netns(b, || {
        Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(i32::from(IPPROTO_IPIP))),
        )
    })??;
    capture.set_read_timeout(Some(Duration::from_secs(2)))?;
    exec(
        a,
        &format!("ping -c 1 -W 2 -M do -Q 0x10 -s {FULL_SIZE_PING} {B_TUN}"),
    )?;
    exec(a, &format!("ping -c 1 -W 2 -M dont -s 100 {B_TUN}"))?;

    let (mut full, mut small) = (None, None);
    let mut buf = [0; 2048];
    while full.is_none() || small.is_none() {
        let n = (&capture)
            .read(&mut buf)
            .context("waiting for the encapsulated pings")?;
        let hdr: [u8; 20] = buf[..20].try_into()?;
        match n {
            1500 => full = Some(hdr),
            148 => small = Some(hdr),
            _ => {}
        }
    }
    for (hdr, df, tos) in [(full.unwrap(), true, 0x10), (small.unwrap(), false, 0)] {
        ensure!(checksum(&hdr) == 0, "bad outer checksum {hdr:02x?}");
        ensure!(hdr[0] == 0x45 && hdr[9] == IPPROTO_IPIP, "{hdr:02x?}");
        ensure!(
            (hdr[6] & 0x40 != 0) == df,
            "outer DF should be {df}: {hdr:02x?}"
        );
        ensure!(hdr[1] == tos, "outer TOS should be {tos:#x}: {hdr:02x?}");
        ensure!(hdr[12..16] == A_UNDERLAY.octets() && hdr[16..20] == B_UNDERLAY.octets());
    }
    Ok(())
}
