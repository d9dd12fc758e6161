//! systemd's readiness protocol (sd_notify(3)): newline-separated
//! `KEY=VALUE` datagrams to the unix socket named in `$NOTIFY_SOCKET`, for
//! a `Type=notify` unit. Without that variable nothing is sent.

use std::{
    io,
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixDatagram},
    },
};

pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The notifier systemd asked for, if it did.
    pub fn from_env() -> io::Result<Option<Self>> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(path) if !path.is_empty() => Self::to(&path).map(Some),
            _ => Ok(None),
        }
    }

    /// Sends to the socket at `path`; a leading `@` names an abstract one.
    pub fn to(path: &str) -> io::Result<Self> {
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(path)?,
        };
        Ok(Self {
            sock: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Sends `state`, e.g. `READY=1\nSTATUS=attached`.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.sock
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
    }
}

/// The message that says the gateway is attached and serving.
pub fn ready(status: &str) -> String {
    format!("READY=1\n{}", self::status(status))
}

/// The message that says the gateway is reloading (`READY=1` follows from
/// the new image), stamped as systemd asks.
pub fn reloading() -> String {
    let now = crate::clock::monotonic_ns() / 1000;
    format!("RELOADING=1\nMONOTONIC_USEC={now}")
}

/// The message that says the gateway is shutting down.
pub const STOPPING: &str = "STOPPING=1";

/// A one-line status for `systemctl status`.
pub fn status(status: &str) -> String {
    format!("STATUS={}", status.replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(listener: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("egress-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::to(path.to_str().unwrap()).unwrap();
        notifier
            .notify(&ready("attached to eth0\n(native XDP)"))
            .unwrap();
        assert_eq!(
            received(&listener),
            "READY=1\nSTATUS=attached to eth0 (native XDP)"
        );
        notifier.notify(STOPPING).unwrap();
        assert_eq!(received(&listener), "STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("egress-notify-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .notify(&status("waiting for eth0"))
            .unwrap();
        assert_eq!(received(&listener), "STATUS=waiting for eth0");
    }
}
