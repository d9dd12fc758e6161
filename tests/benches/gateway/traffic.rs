//! End-to-end traffic through a `BenchLab`: small-packet UDP rate, TCP
//! throughput and request/response latency, client to server.

use crate::fabric::{Fabric, XdpFabric};
use crate::lab::{BenchLab, rx_packets, tx_offered};
use anyhow::{Context, Result, ensure};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use socket2::{Domain, Socket, Type};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tests::addrs::{CLIENT_TUN_IP, HOST_IFACE, SERVER_IP};
use tests::echo::{tcp_sink, udp_server};
use tests::in_netns;
use tests::tiny_bpf::{self, Hook, Program, programs};

/// One generator thread per core, thread i pinned to CPU i: left to the
/// scheduler, half of the eBPF gateway's turns through the XDP fabric came
/// out a quarter low, the generator offering as much less (one in twelve
/// pinned).
const GENERATORS: u16 = 2;
/// Frames per BPF_PROG_TEST_RUN call (a few tenths of a second): between
/// two calls a thread checks whether to stop. Each call ends with the
/// kernel destroying its page pool, which waits for an RCU grace period
/// (about 50 ms here, the thread asleep): at 64 Ki frames a call the CPUs
/// sat a third to half idle and the figures came out 15-25% low.
const FRAMES_PER_CALL: u32 = 1 << 20;
/// Turns each gateway takes at every end-to-end figure.
pub const TRIALS: usize = 5;
const WARM_UP: Duration = Duration::from_millis(500);
pub const RATE_INTERVAL: Duration = Duration::from_secs(1);
pub const TCP_INTERVAL: Duration = Duration::from_secs(1);
/// Requests per gateway, over all its turns.
pub const RR_ROUNDS: usize = 20_000;
const RR_WARM_UP: usize = 1_000;
const RR_CPU: usize = 0;
const RR_TIMEOUT: Duration = Duration::from_secs(1);
const TCP_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7;
const FIRST_SPORT: u16 = 40000;

/// Packets per second offered by the generator and delivered to the server.
pub struct Rate {
    pub offered_pps: f64,
    pub delivered_pps: f64,
}

/// Small UDP packets from `GENERATORS` threads, each its own flow, as fast
/// as BPF_PROG_TEST_RUN's live-frames mode transmits them out of the
/// client's eth0, carried by `fabric`; counted where the server's XDP
/// drops them, and as offered where the client's eth0 sent or dropped them
/// (its peer's ring full).
pub fn udp_rate(lab: &BenchLab, fabric: Fabric) -> Result<Rate> {
    let topo = &lab.topo;
    let _xdp_fabric = match fabric {
        Fabric::KernelRouter => None,
        Fabric::Xdp => Some(XdpFabric::install(lab)?),
    };
    let _sink =
        Program::load(Hook::Xdp, &programs::drop_all())?.attach(&topo.server, HOST_IFACE)?;
    let senders = (0..GENERATORS)
        .map(|i| {
            let frame = lab.small_udp_frame(FIRST_SPORT + i);
            let prog = Program::load(Hook::Xdp, &programs::send_frame(&frame))?;
            Ok((prog, frame))
        })
        .collect::<Result<Vec<_>>>()?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<Rate> {
        let threads: Vec<_> = senders
            .iter()
            .enumerate()
            .map(|(cpu, (prog, frame))| {
                let stop = &stop;
                s.spawn(move || {
                    let _pinned = PinnedToCpu::new(cpu)?;
                    in_netns(&topo.client, || -> Result<()> {
                        let ifindex = tiny_bpf::ifindex(HOST_IFACE)?;
                        while !stop.load(Ordering::Relaxed) {
                            prog.run_live(ifindex, frame, FRAMES_PER_CALL)
                                .context("live frames")?;
                        }
                        Ok(())
                    })?
                })
            })
            .collect();
        // Flows and neighbours are set up during the warm-up.
        std::thread::sleep(WARM_UP);
        let counts = || -> Result<(u64, u64, Instant)> {
            Ok((
                tx_offered(&topo.client, HOST_IFACE)?,
                rx_packets(&topo.server, HOST_IFACE)?,
                Instant::now(),
            ))
        };
        let (offered0, rx0, t0) = counts()?;
        std::thread::sleep(RATE_INTERVAL);
        let (offered1, rx1, t1) = counts()?;
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().expect("generator thread")?;
        }
        let secs = (t1 - t0).as_secs_f64();
        Ok(Rate {
            offered_pps: (offered1 - offered0) as f64 / secs,
            delivered_pps: (rx1 - rx0) as f64 / secs,
        })
    })
}

/// One TCP connection sending for `TCP_INTERVAL`; bits per second the
/// server received, until it confirmed the count.
pub fn tcp_throughput(lab: &BenchLab) -> Result<f64> {
    let topo = &lab.topo;
    let server = SocketAddr::from((SERVER_IP, TCP_PORT));
    let _sink = tcp_sink(&topo.server, server)?;
    let sock = in_netns(&topo.client, || -> std::io::Result<Socket> {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        sock.bind(&SocketAddrV4::new(CLIENT_TUN_IP, 0).into())?;
        Ok(sock)
    })??;
    sock.connect_timeout(&server.into(), RR_TIMEOUT)
        .context("connect to the TCP sink")?;
    let mut stream = TcpStream::from(sock);
    let chunk = vec![0x5a; 1 << 16];
    let start = Instant::now();
    while start.elapsed() < TCP_INTERVAL {
        stream.write_all(&chunk)?;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .context("the sink's byte count")?;
    Ok(u64::from_be_bytes(count) as f64 * 8.0 / start.elapsed().as_secs_f64())
}

/// Round-trip times of `rounds` UDP requests answered by an echo server,
/// one at a time; lost ones are left out and counted. Client and
/// server run on one CPU: otherwise where the scheduler happens to put them
/// decides the figure (p50 moved between 20 and 70 us from run to run).
pub fn rr_latency(lab: &BenchLab, rounds: usize) -> Result<(Vec<Duration>, usize)> {
    let _pinned = PinnedToCpu::new(RR_CPU)?;
    let topo = &lab.topo;
    let server = SocketAddr::from((SERVER_IP, ECHO_PORT));
    let _echo = udp_server(&topo.server, server)?;
    let sock = in_netns(&topo.client, || UdpSocket::bind((CLIENT_TUN_IP, 0)))??;
    sock.connect(server)?;
    sock.set_read_timeout(Some(RR_TIMEOUT))?;
    let (mut rtts, mut lost) = (Vec::with_capacity(rounds), 0);
    for round in 0..RR_WARM_UP + rounds {
        let seq = (round as u64).to_be_bytes();
        let sent = Instant::now();
        sock.send(&seq)?;
        if !await_echo(&sock, &seq)? {
            lost += 1;
        } else if round >= RR_WARM_UP {
            rtts.push(sent.elapsed());
        }
    }
    ensure!(!rtts.is_empty(), "no request was answered");
    Ok((rtts, lost))
}

/// Waits for the echo of `seq` (the echo server appends the request to its
/// reply), skipping late echoes of earlier requests; false on timeout.
fn await_echo(sock: &UdpSocket, seq: &[u8]) -> Result<bool> {
    let mut buf = [0u8; 256];
    loop {
        match sock.recv(&mut buf) {
            Ok(n) if buf[..n].ends_with(seq) => return Ok(true),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Keeps the calling thread, and threads it starts, on one CPU until dropped.
struct PinnedToCpu(CpuSet);

impl PinnedToCpu {
    fn new(cpu: usize) -> Result<Self> {
        let before = sched_getaffinity(Pid::from_raw(0))?;
        let mut one = CpuSet::new();
        one.set(cpu)?;
        sched_setaffinity(Pid::from_raw(0), &one)?;
        Ok(Self(before))
    }
}

impl Drop for PinnedToCpu {
    fn drop(&mut self) {
        let _ = sched_setaffinity(Pid::from_raw(0), &self.0);
    }
}
