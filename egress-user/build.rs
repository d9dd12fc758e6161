//! Builds the eBPF programs (egress-ebpf) for the BPF target with the
//! workspace's pinned nightly; `src/datapath.rs` embeds the result.

fn main() -> aya_build::Result<()> {
    // aya-build watches the eBPF crate; the shared crate is compiled into it too.
    println!(
        "cargo::rerun-if-changed={}/../egress-common",
        env!("CARGO_MANIFEST_DIR")
    );
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../egress-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "egress-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        // Keep in step with rust-toolchain.toml.
        aya_build::Toolchain::Custom("nightly-2026-10-01"),
    )
}
