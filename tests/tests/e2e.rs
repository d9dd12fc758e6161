//! End to end through the real gateway (`EGRESS_BIN`): a client behind an
//! emulated IP-in-IP peer reaches an "Internet" server, which must see the
//! translation address. Every scenario runs once per attach mode, each on
//! its own topology. Needs root.

use anyhow::{Result, ensure};
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;
use tests::addrs::{
    CLIENT_EXTRA_IPS, CLIENT_TUN_IP, GATEWAY_IP, HOST_IFACE, HTTP_PORT, ROUTER_GATEWAY_IFACE,
    ROUTER_GATEWAY_IP, SERVER_IP, TUN_MTU,
};
use tests::echo::{Reply, tcp_request, tcp_server, udp_request, udp_server};
use tests::topology::large_page;
use tests::{Attach, Daemon, Stack, egress_bin, exec, in_netns, require_root};

const ECHO_PORT: u16 = 9000;
const CONNECTIONS: usize = 50;

/// One `#[test]` per attach mode for each scenario, in modules named after
/// the mode: `cargo test tc::` runs one mode, `cargo test ping` one scenario.
macro_rules! in_every_mode {
    ($($scenario:ident),* $(,)?) => {
        in_every_mode!(@mode native Native; $($scenario),*);
        in_every_mode!(@mode generic Generic; $($scenario),*);
        in_every_mode!(@mode tc Tc; $($scenario),*);
    };
    (@mode $module:ident $attach:ident; $($scenario:ident),*) => {
        mod $module {
            $(
                #[test]
                fn $scenario() -> anyhow::Result<()> {
                    super::with_stack(tests::Attach::$attach, super::$scenario)
                }
            )*
        }
    };
}

in_every_mode!(
    http_get_returns_exact_content,
    http_server_sees_translation_address,
    udp_reply_shows_translation_address,
    ping_through_gateway,
    concurrent_tcp_from_several_client_addresses,
    bulk_tcp_with_gro,
    tracepath_shows_the_gateway_hop_and_the_tunnel_mtu,
    ping_with_df_fits_the_tunnel_mtu_exactly,
    large_replies_arrive_or_teach_the_server_the_tunnel_mtu,
);

/// Runs `test` against a fresh stack; a failure keeps the daemons' logs.
fn with_stack(attach: Attach, test: impl FnOnce(&Stack) -> Result<()>) -> Result<()> {
    require_root()?;
    let stack = Stack::start(
        &egress_bin()?,
        Path::new(env!("CARGO_BIN_EXE_ipip-peer")),
        attach,
    )?;
    stack.topo.lab.keep_logs_on_err(test(&stack))
}

/// Serves `large_page()` as /page.txt; returns the server and what `curl` got.
fn http_get(stack: &Stack) -> Result<(Daemon, String)> {
    let topo = &stack.topo;
    let www = topo.lab.dir().join("www");
    std::fs::create_dir(&www)?;
    std::fs::write(www.join("page.txt"), large_page())?;
    let http = topo.start_http_server(&www)?;
    let url = format!("http://{SERVER_IP}:{HTTP_PORT}/page.txt");
    let got = exec(&topo.client, &format!("curl -sS --max-time 20 {url}"))?;
    Ok((http, got))
}

fn http_get_returns_exact_content(stack: &Stack) -> Result<()> {
    let (_http, got) = http_get(stack)?;
    let want = large_page();
    ensure!(
        got == want,
        "got {} bytes, expected {}",
        got.len(),
        want.len()
    );
    Ok(())
}

fn http_server_sees_translation_address(stack: &Stack) -> Result<()> {
    let (mut http, _) = http_get(stack)?;
    // http.server logs `<client address> - - [date] "GET ..."`.
    http.wait_for(&format!("{GATEWAY_IP} - - "), Duration::from_secs(5))?;
    let log = http.log();
    ensure!(
        !log.contains(&CLIENT_TUN_IP.to_string()),
        "client address leaked:\n{log}"
    );
    Ok(())
}

fn udp_reply_shows_translation_address(stack: &Stack) -> Result<()> {
    let server = SocketAddr::from((SERVER_IP, ECHO_PORT));
    let _echo = udp_server(&stack.topo.server, server)?;
    let reply = udp_request(&stack.topo.client, CLIENT_TUN_IP, server, b"hello")?;
    ensure!(reply.body == b"hello", "{reply:?}");
    ensure!(reply.seen.ip() == GATEWAY_IP, "server saw {}", reply.seen);
    Ok(())
}

fn ping_through_gateway(stack: &Stack) -> Result<()> {
    let out = exec(&stack.topo.client, &format!("ping -c 3 -W 2 {SERVER_IP}"))?;
    ensure!(out.contains("3 received"), "{out}");
    Ok(())
}

/// Concurrent connections from every client address: each is echoed intact,
/// every one is seen from the translation address, and no two share a port
/// (they would be one flow to the server).
fn concurrent_tcp_from_several_client_addresses(stack: &Stack) -> Result<()> {
    let server = SocketAddr::from((SERVER_IP, ECHO_PORT));
    let _echo = tcp_server(&stack.topo.server, server)?;
    let sources: Vec<Ipv4Addr> = [CLIENT_TUN_IP]
        .into_iter()
        .chain(CLIENT_EXTRA_IPS)
        .collect();
    let request = |i: usize| format!("connection {i} ").repeat(500).into_bytes();
    let replies: Vec<Result<Reply>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CONNECTIONS)
            .map(|i| {
                let src = sources[i % sources.len()];
                let client = &stack.topo.client;
                s.spawn(move || tcp_request(client, src, server, &request(i)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let mut seen = HashSet::new();
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply?;
        ensure!(reply.body == request(i), "connection {i}: payload changed");
        ensure!(
            reply.seen.ip() == GATEWAY_IP,
            "connection {i}: server saw {}",
            reply.seen
        );
        ensure!(
            seen.insert(reply.seen),
            "connection {i}: {} reused",
            reply.seen
        );
    }
    Ok(())
}

/// Bytes each way in the bulk transfer: many full-sized segments.
const BULK: usize = 4 << 20;
/// Largest frame on the lab's 1500-byte links.
const MAX_FRAME: usize = 1514;

/// A bulk TCP transfer both ways with GRO on the gateway's interface, so the
/// TC hook, which runs after GRO, gets aggregates of many segments: they
/// must leave re-segmented and intact.
fn bulk_tcp_with_gro(stack: &Stack) -> Result<()> {
    let topo = &stack.topo;
    // Like a NIC off the wire: the router sends single segments (a veth
    // skips GRO for a peer that could have sent aggregates itself), and
    // the gateway's interface aggregates them.
    exec(
        &topo.router,
        &format!("ethtool -K {ROUTER_GATEWAY_IFACE} tso off"),
    )?;
    exec(&topo.gateway, &format!("ethtool -K {HOST_IFACE} gro on"))?;
    let server = SocketAddr::from((SERVER_IP, ECHO_PORT));
    let _echo = tcp_server(&topo.server, server)?;
    let tap = tests::tap::Tap::start(&topo.gateway, HOST_IFACE)?;
    let data: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
    let reply = tcp_request(&topo.client, CLIENT_TUN_IP, server, &data)?;
    ensure!(reply.body == data, "payload changed");
    // A packet tap sees what the TC hook gets next; XDP runs before taps.
    if stack.attach == Attach::Tc {
        ensure!(
            tap.largest() > MAX_FRAME,
            "no GRO aggregate reached the hook (largest frame {} bytes)",
            tap.largest()
        );
    }
    ensure!(reply.seen.ip() == GATEWAY_IP, "server saw {}", reply.seen);
    Ok(())
}

/// tracepath from the client: the gateway answers hop 1 itself (time
/// exceeded through the tunnel), the router behind it answers hop 2 (its
/// error relayed back), the server's port unreachable ends the trace, and
/// the path MTU is the tunnel's.
fn tracepath_shows_the_gateway_hop_and_the_tunnel_mtu(stack: &Stack) -> Result<()> {
    let out = exec(
        &stack.topo.client,
        &format!("tracepath -n -m 5 {SERVER_IP}"),
    )?;
    let hop = |n: u8, addr: Ipv4Addr| {
        out.lines()
            .any(|l| l.trim_start().starts_with(&format!("{n}:")) && l.contains(&addr.to_string()))
    };
    ensure!(hop(1, GATEWAY_IP), "hop 1 is not the gateway:\n{out}");
    ensure!(hop(2, ROUTER_GATEWAY_IP), "hop 2 is not the router:\n{out}");
    ensure!(
        out.lines()
            .any(|l| l.contains(&SERVER_IP.to_string()) && l.contains("reached")),
        "server not reached:\n{out}"
    );
    ensure!(out.contains(&format!("pmtu {TUN_MTU}")), "{out}");
    Ok(())
}

/// Don't-fragment pings: the largest that fits the tunnel goes through both
/// ways (its reply encapsulated to exactly 1500 bytes), one byte more is
/// refused at the client with the tunnel's MTU.
fn ping_with_df_fits_the_tunnel_mtu_exactly(stack: &Stack) -> Result<()> {
    let client = &stack.topo.client;
    let largest = TUN_MTU - 28;
    let out = exec(
        client,
        &format!("ping -M do -s {largest} -c 2 -W 2 {SERVER_IP}"),
    )?;
    ensure!(out.contains("2 received"), "{out}");
    let too_big = exec(client, &format!("ping -M do -s 1472 -c 1 -W 2 {SERVER_IP}"));
    let err = too_big.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        err.contains(&format!("mtu={TUN_MTU}")),
        "ping -s 1472: {err}"
    );
    Ok(())
}

/// A 1500-byte UDP reply no longer fits once encapsulated. Without DF the
/// gateway's kernel fragments the tunnel packet and the datagram arrives
/// whole; with DF the gateway answers "fragmentation needed", and the
/// server's kernel learns the tunnel's MTU for the translation address.
fn large_replies_arrive_or_teach_the_server_the_tunnel_mtu(stack: &Stack) -> Result<()> {
    let topo = &stack.topo;
    let client = in_netns(&topo.client, || UdpSocket::bind((CLIENT_TUN_IP, 0)))??;
    client.set_read_timeout(Some(Duration::from_secs(3)))?;
    let server = in_netns(&topo.server, || UdpSocket::bind((SERVER_IP, ECHO_PORT)))??;
    server.set_read_timeout(Some(Duration::from_secs(3)))?;
    client.send_to(b"hello", (SERVER_IP, ECHO_PORT))?;
    let mut buf = vec![0; 2048];
    let (_, translated) = server.recv_from(&mut buf)?;
    server.connect(translated)?;

    let reply: Vec<u8> = (0..1472u32).map(|i| (i % 251) as u8).collect();
    set_pmtu_discovery(&server, libc::IP_PMTUDISC_DONT)?;
    server.send(&reply)?;
    let n = client.recv(&mut buf)?;
    ensure!(buf[..n] == reply[..], "got {n} bytes, sent {}", reply.len());

    set_pmtu_discovery(&server, libc::IP_PMTUDISC_DO)?;
    server.send(&reply)?;
    // The error comes back asynchronously.
    let mut mtu = 0;
    for _ in 0..50 {
        mtu = path_mtu(&server)?;
        if mtu == TUN_MTU {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(mtu == TUN_MTU, "server's path MTU to {translated}: {mtu}");
    Ok(())
}

fn set_pmtu_discovery(sock: &UdpSocket, mode: libc::c_int) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const mode).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "IP_MTU_DISCOVER: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The kernel's path MTU for a connected socket's destination.
fn path_mtu(sock: &UdpSocket) -> Result<u32> {
    use std::os::fd::AsRawFd;
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, and a c_int buffer with its size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&raw mut mtu).cast(),
            &mut len,
        )
    };
    ensure!(rc == 0, "IP_MTU: {}", std::io::Error::last_os_error());
    Ok(mtu as u32)
}
