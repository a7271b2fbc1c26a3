//! `containerd-shim-vmbox-v2 check`: can this host run vmbox, and if not, why.

use vmbox_config::Config;
use vmbox_hypervisor::accel::{choose, HostFacts};
use vmbox_hypervisor::binaries::{resolve, QEMU_HINT, VIRTIOFSD_HINT, VSOCK_HINT};

/// Prints one line per check; returns whether all passed.
pub fn run() -> bool {
    let mut ok = true;
    let mut line = |pass: bool, what: &str, detail: String| {
        ok &= pass;
        println!("{} {what}: {detail}", if pass { "ok  " } else { "FAIL" });
    };
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
