//! `containerd-shim-vmbox-v2 check`: can this host run vmbox, and if not, why.

use vmbox_config::Config;
use vmbox_hypervisor::accel::{choose, HostFacts};
use vmbox_hypervisor::binaries::{resolve, QEMU_HINT, VIRTIOFSD_HINT, VSOCK_HINT};

/// What `check` says under TCG: QEMU's security policy
/// (<https://www.qemu.org/docs/master/system/security.html>) counts only hardware
/// virtualization (KVM) as a security boundary, not the TCG emulator.
pub const TCG_WARNING: &str = "TCG (emulation) is not a security boundary by QEMU's own policy: a guest escape \
through the emulator is not treated as a vulnerability. Containers run, but are isolated like a VM only under KVM.";

/// Prints one line per check (`ok`, `FAIL`, or `WARN` for what works but weakens the
/// isolation); returns whether every check passed (warnings do not fail it).
pub fn run() -> bool {
    let mut ok = true;
    let mut line = |pass: bool, what: &str, detail: String| {
        ok &= pass;
        println!("{} {what}: {detail}", if pass { "ok  " } else { "FAIL" });
    };
    // Runs, but not as strong as it looks.
    let warn = |what: &str, detail: &str| println!("WARN {what}: {detail}");
    let config = match Config::load() {
        Ok(c) => {
            let src = std::env::var(vmbox_config::ENV_VAR).unwrap_or_else(|_| vmbox_config::DEFAULT_PATH.into());
            line(true, "config", src);
            c
        }
        Err(e) => {
            line(false, "config", e.to_string());
            Config::default()
        }
    };
    let (accel, why) = choose(config.vm.accelerator, &HostFacts::probe());
    line(true, "accelerator", format!("{} ({why})", accel.name()));
    if accel == vmbox_hypervisor::Accel::Tcg {
        warn("accelerator", TCG_WARNING);
    }
    for (name, path, hint) in [
        ("qemu-system-x86_64", &config.binaries.qemu, QEMU_HINT),
        ("virtiofsd", &config.binaries.virtiofsd, VIRTIOFSD_HINT),
    ] {
        match resolve(name, path, hint) {
            Ok(p) => line(true, name, p.display().to_string()),
            Err(e) => line(false, name, e.to_string()),
        }
    }
    let kernel_vsock = std::path::Path::new("/dev/vhost-vsock").exists();
    match config.vm.vsock {
        vmbox_config::VsockBackend::Kernel => {
            line(kernel_vsock, "vsock", "kernel vhost-vsock (/dev/vhost-vsock)".into())
        }
        vmbox_config::VsockBackend::Auto if kernel_vsock => line(true, "vsock", "kernel vhost-vsock".into()),
        _ => match resolve("vhost-device-vsock", &config.binaries.vhost_device_vsock, VSOCK_HINT) {
            Ok(p) => line(true, "vsock", format!("vhost-user via {}", p.display())),
            Err(e) => line(false, "vsock", e.to_string()),
        },
    }
    let tun = std::path::Path::new("/dev/net/tun");
    line(
        tun.exists(),
        "tun",
        if tun.exists() {
            "/dev/net/tun (pod networking's taps)".into()
        } else {
            "/dev/net/tun missing: pods with a network cannot start (modprobe tun)".into()
        },
    );
    for (what, p) in [
        ("guest kernel", &config.vm.kernel),
        ("guest initramfs", &config.vm.initramfs),
    ] {
        let found = p.is_file();
        let detail = if found {
            p.display().to_string()
        } else {
            format!("{} missing: run `make install`", p.display())
        };
        line(found, what, detail);
    }
    ok
}
