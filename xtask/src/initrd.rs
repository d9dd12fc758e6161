//! The Linux 6.1 VM's initramfs, built from pieces on the machine: a
//! static busybox, the kernel package's own modules for the 9p root, and
//! an init script. The same inputs give the same bytes (fixed owners,
//! times and inode numbers), so nothing binary is checked in.

use std::{collections::HashMap, fs, path::Path};

use anyhow::{Context, Result, bail};

/// What the guest needs before it can mount the host's root: virtio PCI,
/// and 9p over virtio.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// What `init` does: mount the host's root read-only over 9p (tag
/// `hostroot`) with the kernel's full module tree (`egmods=`), fresh
/// tmpfs on /tmp, /run and /var/tmp (but for the paths `egkeep=` names
/// under them) and a writable `out` share (at `egout=`) in place, run the
/// script `egrun=` names in it (as root, in a chroot, so every path is
/// the host's), and power off. The guest's
/// second serial port (ttyS1) carries the script's output and a closing
/// `egress-vm: exit N` line; the first, the kernel's console.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
# The kernel loads modules on demand (veth, ...) with this, /sbin/modprobe by default.
echo /bin/modprobe > /proc/sys/kernel/modprobe
exec >/dev/ttyS1 2>&1
for a in $(cat /proc/cmdline); do
  case $a in
    egrun=*) RUN=${a#egrun=};; egout=*) OUT=${a#egout=};; egmods=*) MODS=${a#egmods=};;
    egkeep=*) KEEP="$KEEP ${a#egkeep=}";;
  esac
done
echo "egress-vm: Linux $(uname -r) up"
@INSMOD@
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /root || echo "egress-vm: 9p mount of the host's root failed"
K=$(uname -r)
mkdir -p /lib/modules/$K && mount --bind /root$MODS /lib/modules/$K
mkdir -p /host && mount --bind /root /host
for d in tmp run var/tmp; do mount -t tmpfs tmpfs /root/$d; done
# What the guest needs of the host's files (the workspace, its target
# directory) is put back where a tmpfs above covered it.
for p in $KEEP; do
  [ -e /root$p ] || { mkdir -p /root$p && mount --bind /host$p /root$p; }
done
mount -t proc proc /root/proc; mount -t sysfs sys /root/sys; mount -t devtmpfs dev /root/dev
mkdir -p /root/dev/shm /root/dev/pts; mount -t tmpfs tmpfs /root/dev/shm; mount -t devpts devpts /root/dev/pts
mount -t bpf bpf /root/sys/fs/bpf
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /root$OUT || echo "egress-vm: 9p mount of the output share failed"
chroot /root /bin/sh "$RUN"
echo "egress-vm: exit $?"
sync
poweroff -f
"#;

/// The initramfs: `busybox` as /bin/busybox, the boot modules (and what they
/// depend on) from `modules` (an unpacked lib/modules/VERSION with its
/// modules.dep) loaded in order by /init.
pub fn build(busybox: &Path, modules: &Path) -> Result<Vec<u8>> {
    let dep = fs::read_to_string(modules.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", modules.display()))?;
    let order = load_order(&dep, BOOT_MODULES)?;

    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "root", "lib", "lib/modules"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &fs::read(busybox)?);
    let mut insmod = String::new();
    for path in &order {
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .context("module path without a file name")?;
        cpio.file(
            &format!("lib/modules/{name}"),
            0o644,
            &fs::read(modules.join(path)).with_context(|| format!("reading module {path}"))?,
        );
        insmod.push_str(&format!(
            "insmod /lib/modules/{name} || echo \"egress-vm: insmod {name} failed\"\n"
        ));
    }
    cpio.file(
        "init",
        0o755,
        INIT.replace("@INSMOD@\n", &insmod).as_bytes(),
    );
    Ok(cpio.finish())
}

/// The module files (paths as modules.dep gives them) that load `wanted`,
/// each after everything it depends on.
fn load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>> {
    // "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko"
    let deps: HashMap<&str, Vec<&str>> = modules_dep
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| (module.trim(), deps.split_whitespace().collect()))
        .collect();
    let by_name: HashMap<String, &str> =
        deps.keys().map(|path| (module_name(path), *path)).collect();
    let mut order = Vec::new();
    for name in wanted {
        let Some(path) = by_name.get(&name.replace('-', "_")) else {
            bail!("the kernel package has no module {name} (is it built in, or renamed?)");
        };
        visit(path, &deps, &mut order)?;
    }
    Ok(order)
}

fn visit(path: &str, deps: &HashMap<&str, Vec<&str>>, order: &mut Vec<String>) -> Result<()> {
    if order.iter().any(|p| p == path) {
        return Ok(());
    }
    let Some(needs) = deps.get(path) else {
        bail!("modules.dep names {path} as a dependency but has no line for it");
    };
    for need in needs {
        visit(need, deps, order)?;
    }
    order.push(path.to_owned());
    Ok(())
}

/// A module's name as modprobe spells it: file name without `.ko`
/// (or `.ko.xz` and the like), dashes as underscores.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A "newc" cpio archive, the format the kernel unpacks an initramfs from.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, path: &str) {
        self.entry(path, 0o040_755, 0, 0, &[]);
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, 0o100_000 | perm, 0, 0, data);
    }

    fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.entry(path, 0o020_600, major, minor, &[]);
    }

    fn entry(&mut self, path: &str, mode: u32, rdev_major: u32, rdev_minor: u32, data: &[u8]) {
        self.inode += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let size = u32::try_from(data.len()).expect("initramfs files are far below 4 GiB");
        let name_size = u32::try_from(path.len() + 1).expect("short paths");
        // ino mode uid gid nlink mtime filesize devmajor devminor
        // rdevmajor rdevminor namesize check: eight hex digits each.
        let fields = [
            self.inode, mode, 0, 0, nlink, 0, size, 0, 0, rdev_major, rdev_minor, name_size, 0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(path.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// Header and name, and data, each end on a 4-byte boundary.
    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, 0, &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko
kernel/net/9p/9pnet.ko:
kernel/fs/netfs/netfs.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/drivers/virtio/virtio.ko kernel/net/9p/9pnet.ko
kernel/drivers/virtio/virtio.ko:
";

    #[test]
    fn modules_load_after_their_dependencies_once_each() {
        assert_eq!(
            load_order(DEP, &["9pnet_virtio", "9p"]).unwrap(),
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/net/9p/9pnet.ko",
                "kernel/net/9p/9pnet_virtio.ko",
                "kernel/fs/netfs/netfs.ko",
                "kernel/fs/9p/9p.ko",
            ]
        );
    }

    #[test]
    fn a_missing_module_is_named() {
        let err = load_order(DEP, &["virtio_pci"]).unwrap_err();
        assert!(err.to_string().contains("no module virtio_pci"), "{err}");
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"abc");
        let bytes = cpio.finish();
        // 110-byte header, "init\0" padded to 116, "abc" padded to 120.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[14..22], b"000081ed");
        assert_eq!(&bytes[54..62], b"00000003");
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(&bytes[116..119], b"abc");
        assert_eq!(&bytes[120..126], b"070701");
        assert!(bytes.ends_with(b"TRAILER!!!\0\0\0\0"));
        assert!(bytes.len().is_multiple_of(4));
    }
}
