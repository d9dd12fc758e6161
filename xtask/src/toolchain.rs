//! bpf-linker bootstrap.
//!
//! bpf-linker must link the same LLVM as the nightly that compiles the eBPF
//! crate, and no matching LLVM dev package exists on Debian 12, so we build it
//! against the shared libLLVM that the pinned nightly ships in its sysroot.

use std::{fs, io, os::unix::fs::symlink, path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::workspace::{Workspace, capture, step};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Builds bpf-linker into `target/tools/` once per (bpf-linker, rustc) pair and
/// puts it first on the children's PATH.
pub fn ensure_bpf_linker(ws: &mut Workspace) -> Result<()> {
    let rustc = capture(ws.command("rustc").arg("--version"))?;
    // A toolchain bump must rebuild: the key changes with rustc's version and commit.
    let key = rustc
        .trim_start_matches("rustc ")
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let root = ws
        .target_dir
        .join("tools")
        .join(format!("bpf-linker-{BPF_LINKER_VERSION}-{key}"));
    let bin_dir = root.join("bin");
    let linker = bin_dir.join("bpf-linker");

    // bpf-linker's RUNPATH points at this prefix, so it must outlive the build.
    let prefix = root.join("llvm");
    link_rust_llvm(ws, &prefix.join("lib"))?;

    let works = |linker: &Path| {
        Command::new(linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !works(&linker) {
        step(
            &format!(
                "build bpf-linker {BPF_LINKER_VERSION} into {}",
                root.display()
            ),
            ws.cargo()
                .args(["install", "bpf-linker", "--locked", "--force"])
                .args(["--version", BPF_LINKER_VERSION, "--root"])
                .arg(&root)
                .env("LLVM_PREFIX", &prefix),
        )?;
        if !works(&linker) {
            bail!("{} was installed but does not run", linker.display());
        }
    }
    ws.prepend_path(bin_dir);
    Ok(())
}

/// Makes `lib_dir` hold `libLLVM.so` (for linking) and a link named by the
/// library's soname (for the runtime RUNPATH lookup), both to the sysroot's libLLVM.
fn link_rust_llvm(ws: &Workspace, lib_dir: &Path) -> Result<()> {
    let sysroot = capture(ws.command("rustc").args(["--print", "sysroot"]))?;
    let sys_lib = Path::new(sysroot.trim()).join("lib");
    let llvm = fs::read_dir(&sys_lib)
        .with_context(|| format!("reading {}", sys_lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", sys_lib.display()))?;
    fs::create_dir_all(lib_dir)?;
    let soname = llvm.file_name().expect("read_dir entries have names");
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        let link = lib_dir.join(name);
        if fs::read_link(&link).is_ok_and(|target| target == llvm) {
            continue;
        }
        // A stale link (e.g. from a reinstalled toolchain) is replaced.
        match fs::remove_file(&link) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        symlink(&llvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}
