//! RFC 2003 IP-in-IP endpoint in user space, standing in for the kernel ipip
//! module this machine lacks. Datagrams the host routes into the TUN device
//! go out encapsulated to `--remote`; protocol-4 datagrams from `--remote` to
//! `--local` come back out of the TUN device decapsulated. Runs until killed.
//!
//! usage: ipip-peer --tun tun0 --local 10.0.1.10 --remote 10.1.1.10

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use tests::ipip::{IPPROTO_IPIP, decapsulate, encapsulate};

struct Args {
    tun: String,
    local: Ipv4Addr,
    remote: Ipv4Addr,
}

fn parse_args() -> Result<Args> {
    let (mut tun, mut local, mut remote) = (None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--tun" => tun = Some(value),
            "--local" => local = Some(value.parse().context("--local")?),
            "--remote" => remote = Some(value.parse().context("--remote")?),
            _ => bail!("unknown argument {flag}"),
        }
    }
    Ok(Args {
        tun: tun.context("--tun is required")?,
        local: local.context("--local is required")?,
        remote: remote.context("--remote is required")?,
    })
}

/// Attaches to TUN device `name` (created if missing), packets without the
/// packet-info prefix.
fn open_tun(name: &str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("open /dev/net/tun")?;
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name {name:?} too long");
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("TUNSETIFF {name}"));
    }
    Ok(file)
}

/// TUN -> raw socket. IPPROTO_RAW implies IP_HDRINCL: we send whole datagrams.
fn encap_loop(mut tun: File, tx: Socket, local: Ipv4Addr, remote: Ipv4Addr) -> Result<()> {
    let to = SockAddr::from(SocketAddrV4::new(remote, 0));
    let mut id = std::process::id() as u16;
    let mut buf = vec![0; 65536];
    loop {
        let n = tun.read(&mut buf).context("read TUN")?;
        let Some(pkt) = encapsulate(&buf[..n], local, remote, id) else {
            continue;
        };
        id = id.wrapping_add(1);
        // A send can fail transiently (no route yet, neighbour trouble); the
        // inner transport retransmits, as over a real tunnel.
        if let Err(e) = tx.send_to(&pkt, &to) {
            eprintln!("send to {remote}: {e}");
        }
    }
}

/// Raw protocol-4 socket -> TUN. With no kernel ipip handler the raw socket
/// gets every protocol-4 datagram for this namespace, outer header included.
fn decap_loop(rx: Socket, mut tun: File, local: Ipv4Addr, remote: Ipv4Addr) -> Result<()> {
    let mut buf = vec![0; 65536];
    loop {
        let n = (&rx).read(&mut buf).context("read raw socket")?;
        match decapsulate(&buf[..n], local, remote) {
            Ok(Some(inner)) => {
                if let Err(e) = tun.write(inner) {
                    eprintln!("write TUN: {e}");
                }
            }
            Ok(None) => {}
            Err(why) => eprintln!("dropping datagram from {remote}: {why}"),
        }
    }
}

/// A loop that ends has failed; the emulator is useless half-working.
fn spawn_fatal(
    name: &'static str,
    f: impl FnOnce() -> Result<()> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Err(e) = f() {
            eprintln!("ipip-peer {name}: {e:#}");
            std::process::exit(1);
        }
    })
}

fn main() -> Result<()> {
    let Args { tun, local, remote } = parse_args()?;
    let tun_in = open_tun(&tun)?;
    let tun_out = tun_in.try_clone()?;
    let tx = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("raw IPPROTO_RAW socket")?;
    let rx = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(i32::from(IPPROTO_IPIP))),
    )
    .context("raw IPPROTO_IPIP socket")?;
    println!("ipip-peer ready: {tun} local {local} remote {remote}");
    let up = spawn_fatal("encapsulation", move || {
        encap_loop(tun_in, tx, local, remote)
    });
    let down = spawn_fatal("decapsulation", move || {
        decap_loop(rx, tun_out, local, remote)
    });
    let _ = (up.join(), down.join());
    Ok(())
}
