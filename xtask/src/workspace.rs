//! Workspace paths and the environment shared by every child command.

use std::{
    env,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub struct Workspace {
    root: PathBuf,
    pub target_dir: PathBuf,
    /// PATH for children: tool dirs get prepended as they are bootstrapped.
    path: Vec<PathBuf>,
}

impl Workspace {
    pub fn load() -> Result<Self> {
        let out = Command::new(cargo_exe())
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .output()
            .context("running cargo metadata")?;
        if !out.status.success() {
            bail!(
                "cargo metadata failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let field = |name: &str| -> Result<PathBuf> {
            meta[name]
                .as_str()
                .map(PathBuf::from)
                .with_context(|| format!("cargo metadata has no {name}"))
        };
        let mut path: Vec<PathBuf> =
            env::split_paths(&env::var_os("PATH").unwrap_or_default()).collect();
        // ip and ethtool live in sbin, which a non-login root environment may lack.
        for sbin in ["/usr/sbin", "/sbin"] {
            if !path.iter().any(|p| p == Path::new(sbin)) {
                path.push(sbin.into());
            }
        }
        Ok(Self {
            root: field("workspace_root")?,
            target_dir: field("target_directory")?,
            path,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn prepend_path(&mut self, dir: PathBuf) {
        self.path.insert(0, dir);
    }

    fn path_var(&self) -> OsString {
        env::join_paths(&self.path).expect("PATH entries come from PATH or our own dirs")
    }

    /// Whether `name` resolves to a file on the children's PATH.
    pub fn has_command(&self, name: &str) -> bool {
        self.path.iter().any(|dir| dir.join(name).is_file())
    }

    /// A command run in the workspace root with the children's PATH.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root).env("PATH", self.path_var());
        cmd
    }

    pub fn cargo(&self) -> Command {
        self.command(cargo_exe())
    }

    /// The gateway binary of a profile; fails if the build did not produce it.
    pub fn egress_bin(&self, release: bool) -> Result<PathBuf> {
        let bin = self.profile_dir(release).join("egress");
        if !bin.is_file() {
            bail!("{} was not built", bin.display());
        }
        Ok(bin)
    }

    pub fn profile_dir(&self, release: bool) -> PathBuf {
        self.target_dir
            .join(if release { "release" } else { "debug" })
    }
}

/// `cargo run` sets CARGO to the cargo of the active toolchain.
fn cargo_exe() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Runs one named step, failing with that name if it does not succeed.
pub fn step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> xtask: {name}");
    let status = cmd
        .status()
        .with_context(|| format!("step `{name}`: could not start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("step `{name}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its standard output; fails with its standard
/// error if it fails.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The privileged steps load eBPF programs and create network namespaces.
pub fn require_root(command: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`cargo xtask {command}` must run as root: it loads eBPF programs and \
             creates network namespaces (try `sudo -E env PATH=\"$PATH\" cargo xtask {command}`)"
        );
    }
    Ok(())
}
