//! Echo servers that also report the source address and port they saw
//! (what the gateway translated the client to), and their clients. A reply
//! is `"<peer ip:port>\n<request bytes>"`.

use crate::netns::in_netns;
use anyhow::{Context, Result, bail, ensure};
use socket2::{Domain, Socket, Type};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often a server looks at its stop flag.
const TICK: Duration = Duration::from_millis(50);
/// A TCP peer that stalls longer than this is given up on.
const IDLE: Duration = Duration::from_secs(15);
const UDP_WAIT: Duration = Duration::from_secs(2);
const UDP_TRIES: usize = 3;

/// A running server; stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(mut serve: impl FnMut() -> io::Result<()> + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match serve() {
                    Ok(()) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        std::thread::sleep(TICK)
                    }
                    Err(e) => panic!("server: {e}"),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Replies to each datagram with the peer it came from and its payload.
/// Blocks for the next datagram (up to a `TICK`), so a request is answered
/// at once: the benchmark measures latency through it.
pub fn udp_server(ns: &str, addr: SocketAddr) -> Result<Server> {
    let sock = in_netns(ns, || UdpSocket::bind(addr))??;
    sock.set_read_timeout(Some(TICK))?;
    let mut buf = vec![0; 65536];
    Ok(Server::start(move || {
        let (n, peer) = sock.recv_from(&mut buf)?;
        sock.send_to(&reply(peer, &buf[..n]), peer)?;
        Ok(())
    }))
}

/// For each connection: reads the request until the client shuts down its
/// sending side, answers, closes. Connections are served concurrently.
pub fn tcp_server(ns: &str, addr: SocketAddr) -> Result<Server> {
    serve_tcp(ns, addr, "tcp_server", |mut stream, peer| {
        let mut request = Vec::new();
        stream.read_to_end(&mut request)?;
        stream.write_all(&reply(peer, &request))
    })
}

/// For each connection: counts the bytes received until the client shuts
/// down its sending side, then answers with the count (8 bytes, big-endian).
pub fn tcp_sink(ns: &str, addr: SocketAddr) -> Result<Server> {
    serve_tcp(ns, addr, "tcp_sink", |mut stream, _| {
        let count = io::copy(&mut stream, &mut io::sink())?;
        stream.write_all(&count.to_be_bytes())
    })
}

/// Accepts connections on `addr` in `ns`; each is handled on its own thread
/// as a blocking stream that gives up after `IDLE`.
fn serve_tcp(
    ns: &str,
    addr: SocketAddr,
    name: &'static str,
    handle: fn(TcpStream, SocketAddr) -> io::Result<()>,
) -> Result<Server> {
    let listener = in_netns(ns, || TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    Ok(Server::start(move || {
        let (stream, peer) = listener.accept()?;
        std::thread::spawn(move || {
            let served = stream
                .set_nonblocking(false)
                .and_then(|()| stream.set_read_timeout(Some(IDLE)))
                .and_then(|()| handle(stream, peer));
            if let Err(e) = served {
                eprintln!("{name}: {peer}: {e}");
            }
        });
        Ok(())
    }))
}

fn reply(peer: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut out = format!("{peer}\n").into_bytes();
    out.extend_from_slice(request);
    out
}

/// What a server answered: the source it saw and the echoed request.
#[derive(Debug)]
pub struct Reply {
    pub seen: SocketAddr,
    pub body: Vec<u8>,
}

impl Reply {
    fn parse(reply: &[u8]) -> Result<Self> {
        let nl = reply
            .iter()
            .position(|&b| b == b'\n')
            .context("reply has no newline")?;
        let seen = std::str::from_utf8(&reply[..nl])?.parse()?;
        Ok(Self {
            seen,
            body: reply[nl + 1..].to_vec(),
        })
    }
}

/// Sends `request` from `src` (any port) in `ns` to a `udp_server`, retrying
/// a lost datagram as a UDP client would.
pub fn udp_request(ns: &str, src: Ipv4Addr, dst: SocketAddr, request: &[u8]) -> Result<Reply> {
    UdpClient::bind(ns, src)?.request(dst, request)
}

/// A UDP socket in a namespace that keeps its port across requests.
pub struct UdpClient {
    sock: UdpSocket,
    src: Ipv4Addr,
}

impl UdpClient {
    /// Binds to `src` and any port in `ns`.
    pub fn bind(ns: &str, src: Ipv4Addr) -> Result<Self> {
        let sock = in_netns(ns, || UdpSocket::bind((src, 0)))??;
        sock.set_read_timeout(Some(UDP_WAIT))?;
        Ok(Self { sock, src })
    }

    /// Sends `request` to a `udp_server`, retrying a lost datagram.
    pub fn request(&self, dst: SocketAddr, request: &[u8]) -> Result<Reply> {
        let mut buf = vec![0; 65536];
        for _ in 0..UDP_TRIES {
            self.sock.send_to(request, dst)?;
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    ensure!(from == dst, "reply from {from}, expected {dst}");
                    return Reply::parse(&buf[..n]);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
        bail!(
            "no UDP reply from {dst} to {} after {UDP_TRIES} tries",
            self.src
        )
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }
}

/// Connects from `src` (any port) in `ns` to a `tcp_server`, sends `request`,
/// half-closes and reads the reply.
pub fn tcp_request(ns: &str, src: Ipv4Addr, dst: SocketAddr, request: &[u8]) -> Result<Reply> {
    let sock = in_netns(ns, || -> io::Result<Socket> {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        sock.bind(&SocketAddrV4::new(src, 0).into())?;
        Ok(sock)
    })??;
    sock.connect_timeout(&dst.into(), IDLE)
        .with_context(|| format!("connect {src} -> {dst}"))?;
    let mut stream = TcpStream::from(sock);
    stream.set_read_timeout(Some(IDLE))?;
    stream.write_all(request)?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .with_context(|| format!("read reply {dst} -> {src}"))?;
    Reply::parse(&reply)
}
