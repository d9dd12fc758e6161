//! The real binary on config files with each kind of mistake: rejected,
//! with a message naming the key; and `egress config --dump` reads back
//! as itself. Needs no root.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, ensure};

/// A file in a directory of its own, removed on drop.
struct Scratch {
    dir: PathBuf,
    file: PathBuf,
}

impl Scratch {
    fn write(name: &str, text: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("egress-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join(name);
        std::fs::write(&file, text)?;
        Ok(Self { dir, file })
    }

    fn path(&self) -> Result<&str> {
        self.file.to_str().context("non-UTF-8 temporary path")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `egress config ARGS`: success, stdout, stderr.
fn config(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(tests::egress_bin()?)
        .arg("config")
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .context("cannot run egress")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

const VALID: &str = "iface = \"eth0\"\npeer = [\"10.0.1.10\"]\nclient-cidr = [\"10.0.0.0/16\"]\n";

/// A valid file with `mistake` appended (or `VALID`'s key replaced) must
/// be refused with a one-line message naming `key`.
fn refused(name: &str, text: &str, key: &str) -> Result<()> {
    let file = Scratch::write(name, text)?;
    let (ok, _, err) = config(&["--config", file.path()?])?;
    ensure!(!ok, "{text:?} was accepted");
    ensure!(err.starts_with("error: "), "{err}");
    ensure!(err.lines().count() == 1, "not one line: {err}");
    ensure!(err.contains(key), "{key:?} not named in: {err}");
    Ok(())
}

#[test]
fn unknown_key() -> Result<()> {
    refused(
        "unknown.toml",
        &format!("{VALID}max-flow = 10\n"),
        "`max-flow`",
    )?;
    refused(
        "unknown-table.toml",
        &format!("{VALID}[timeouts]\ntcp = \"1m\"\n"),
        "`tcp`",
    )
}

#[test]
fn duplicate_key() -> Result<()> {
    refused(
        "duplicate.toml",
        &format!("{VALID}iface = \"eth1\"\n"),
        "key `iface`",
    )
}

/// The same peer or translation address twice: a slip for another
/// address, refused by `egress config` (and so `egress run`) and a problem
/// for `egress check`, in the file or as flags, naming the address.
#[test]
fn address_listed_twice() -> Result<()> {
    let peer_twice = VALID.replace("\"10.0.1.10\"]", "\"10.0.1.10\", \"10.0.1.10\"]");
    refused(
        "peer-twice.toml",
        &peer_twice,
        "peer: 10.0.1.10 is listed twice",
    )?;
    let snat_twice = format!("{VALID}snat = [\"10.1.1.10\", \"10.1.1.11\", \"10.1.1.10\"]\n");
    refused(
        "snat-twice.toml",
        &snat_twice,
        "snat: 10.1.1.10 is listed twice",
    )?;
    let flags = ["--iface", "eth0", "--client-cidr", "10.0.0.0/16"];
    let peer_flags = ["--peer", "10.0.1.10", "--peer", "10.0.1.10"];
    let (ok, _, err) = config(&[&flags[..], &peer_flags].concat())?;
    ensure!(
        !ok && err.contains("peer: 10.0.1.10 is listed twice"),
        "{err}"
    );

    let file = Scratch::write("check-snat-twice.toml", &snat_twice)?;
    let out = Command::new(tests::egress_bin()?)
        .args(["check", "--config", file.path()?])
        .env("RUST_LOG", "off")
        .output()
        .context("cannot run egress")?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success()
            && report.starts_with("PROBLEM  configuration: snat: 10.1.1.10 is listed twice"),
        "{report}"
    );
    Ok(())
}

#[test]
fn bad_cidr() -> Result<()> {
    let text = VALID.replace("10.0.0.0/16", "10.0.0.0/33");
    refused("cidr.toml", &text, "key `client-cidr`")
}

#[test]
fn bad_port_range() -> Result<()> {
    refused(
        "ports.toml",
        &format!("{VALID}ports = \"2048-1024\"\n"),
        "key `ports`",
    )
}

#[test]
fn bad_duration() -> Result<()> {
    refused(
        "duration.toml",
        &format!("{VALID}[timeouts]\nudp = \"5 fortnights-ish\"\n"),
        "key `timeouts.udp`",
    )
}

#[test]
fn bad_address() -> Result<()> {
    let text = VALID.replace("10.0.1.10", "10.0.1.300");
    refused("peer.toml", &text, "key `peer`")?;
    refused(
        "metrics.toml",
        &format!("{VALID}metrics = \"localhost\"\n"),
        "key `metrics`",
    )
}

#[test]
fn wrong_type() -> Result<()> {
    refused(
        "type.toml",
        &format!("{VALID}max-flows = \"lots\"\n"),
        "key `max-flows`",
    )
}

#[test]
fn value_out_of_range() -> Result<()> {
    refused(
        "range.toml",
        &format!("{VALID}max-flows = 0\n"),
        "max-flows",
    )?;
    refused(
        "zero.toml",
        &format!("{VALID}[timeouts]\nicmp = \"0s\"\n"),
        "timeouts.icmp",
    )
}

#[test]
fn missing_required_key() -> Result<()> {
    refused("missing.toml", "peer = [\"10.0.1.10\"]\n", "iface")
}

#[test]
fn dump_of_the_sample_reads_back_as_itself() -> Result<()> {
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/gateway.toml");
    let (ok, dump, err) = config(&["--dump", "--config", sample])?;
    ensure!(ok, "{err}");
    let file = Scratch::write("dump.toml", &dump)?;
    let (ok, again, err) = config(&["--dump", "--config", file.path()?])?;
    ensure!(ok, "{err}");
    ensure!(
        again == dump,
        "dump changed on reading back:\n{dump}\n---\n{again}"
    );
    // Flags override the file, and show in the dump.
    let (_, flagged, _) = config(&["--dump", "--config", sample, "--ports", "2000-3000"])?;
    ensure!(flagged.contains("ports = \"2000-3000\""), "{flagged}");
    Ok(())
}
