//! Debian packages fetched with `apt-get download` and unpacked with
//! `dpkg-deb -x` under target/, for the Linux 6.1 VM: never installed on
//! the host (a kernel package would write to its /boot).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::workspace::{Workspace, capture, step};

/// A package at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub name: String,
    pub version: String,
}

impl Pinned {
    pub fn new(name: &str, version: &str) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
        }
    }
}

/// Where packages are downloaded and unpacked, and what apt knows of them.
pub struct Cache<'a> {
    ws: &'a Workspace,
    dir: PathBuf,
    /// Whether `apt-get update` ran in this process: once is enough.
    updated: bool,
}

/// Written into an unpacked tree once it is complete.
const UNPACKED_STAMP: &str = ".unpacked";

impl<'a> Cache<'a> {
    pub fn new(ws: &'a Workspace, dir: PathBuf) -> Self {
        Self {
            ws,
            dir,
            updated: false,
        }
    }

    /// The directory `package` is (or would be) unpacked in.
    pub fn unpacked_dir(&self, package: &Pinned) -> PathBuf {
        // An epoch's colon escaped as apt escapes it in file names: QEMU
        // and the kernel command line take colons as separators.
        let version = package.version.replace(':', "%3a");
        self.dir.join(format!("{}_{version}", package.name))
    }

    pub fn is_unpacked(&self, package: &Pinned) -> bool {
        self.unpacked_dir(package).join(UNPACKED_STAMP).is_file()
    }

    /// Downloads `package` and unpacks it, once: a tree already unpacked
    /// is reused without asking apt anything. `after_unpack` runs on a new
    /// tree before it is marked complete.
    pub fn unpack(
        &mut self,
        package: &Pinned,
        after_unpack: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let dir = self.unpacked_dir(package);
        if self.is_unpacked(package) {
            return Ok(dir);
        }
        let deb = self.download(package)?;
        // A tree left half-written by an interrupted run is replaced.
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        step(
            &format!("unpack {} into {}", deb.display(), dir.display()),
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir),
        )?;
        after_unpack(&dir)?;
        fs::write(dir.join(UNPACKED_STAMP), "")?;
        // The tree is what is kept; the archive would only double the space.
        fs::remove_file(&deb)?;
        Ok(dir)
    }

    fn download(&mut self, package: &Pinned) -> Result<PathBuf> {
        fs::create_dir_all(&self.dir)?;
        if !self.offers(package)? {
            bail!(
                "apt offers no {} {} (apt-cache madison {} lists what it has)",
                package.name,
                package.version,
                package.name
            );
        }
        let spec = format!("{}={}", package.name, package.version);
        step(
            &format!("apt-get download {spec}"),
            self.ws
                .command("apt-get")
                // As root apt would hand the download to user _apt, who
                // cannot write into target/.
                .args(["-o", "APT::Sandbox::User=root", "download", &spec])
                .current_dir(&self.dir),
        )?;
        // apt names the file NAME_VERSION_ARCH.deb with the epoch's colon
        // escaped; find it rather than rebuild that name.
        let prefix = format!("{}_", package.name);
        fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.extension().is_some_and(|e| e == "deb")
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
            })
            .with_context(|| {
                format!(
                    "apt-get download {spec} left no .deb in {}",
                    self.dir.display()
                )
            })
    }

    /// Refreshes apt's package lists, at most once per run.
    fn update(&mut self) -> Result<()> {
        if !self.updated {
            step(
                "apt-get update",
                self.ws
                    .command("apt-get")
                    .arg("update")
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            self.updated = true;
        }
        Ok(())
    }

    /// Whether apt can fetch `package`, after refreshing its lists if they
    /// lack it (a fresh machine has none).
    pub fn offers(&mut self, package: &Pinned) -> Result<bool> {
        if !self.versions(&package.name)?.contains(&package.version) {
            self.update()?;
        }
        Ok(self.versions(&package.name)?.contains(&package.version))
    }

    /// The versions of `name` the package lists offer, newest first.
    fn versions(&self, name: &str) -> Result<Vec<String>> {
        let out = capture(self.ws.command("apt-cache").args(["madison", name]))?;
        // "name | version | source"
        Ok(out
            .lines()
            .filter_map(|line| line.split('|').nth(1))
            .map(|v| v.trim().to_owned())
            .collect())
    }

    /// Package names matching the extended regular expression `pattern`.
    pub fn names_matching(&self, pattern: &str) -> Result<Vec<String>> {
        let out = capture(
            self.ws
                .command("apt-cache")
                .args(["search", "--names-only", pattern]),
        )?;
        Ok(out
            .lines()
            .filter_map(|line| line.split(" - ").next())
            .map(str::to_owned)
            .collect())
    }

    /// Whether Debian version `a` is newer than `b`.
    fn newer(&self, a: &str, b: &str) -> bool {
        self.ws
            .command("dpkg")
            .args(["--compare-versions", a, "gt", b])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The newest of `names` at its newest version.
    pub fn newest_of(&self, names: &[String]) -> Result<Option<Pinned>> {
        let mut best: Option<Pinned> = None;
        for name in names {
            for version in self.versions(name)? {
                if best
                    .as_ref()
                    .is_none_or(|b| self.newer(&version, &b.version))
                {
                    best = Some(Pinned::new(name, &version));
                }
            }
        }
        Ok(best)
    }
}

/// Fails unless `dir` holds exactly one entry whose name starts with
/// `prefix`, and returns it.
pub fn single_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    match <[PathBuf; 1]>::try_from(found) {
        Ok([one]) => Ok(one),
        Err(found) => bail!(
            "expected one {prefix}* in {}, found {}",
            dir.display(),
            found.len()
        ),
    }
}
