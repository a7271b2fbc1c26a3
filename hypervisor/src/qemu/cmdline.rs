//! QEMU's command line and the guest kernel's, built by pure functions from what the
//! backend decided (accelerator, sockets, vsock transport), so they can be tested without
//! starting anything.
//!
//! QEMU option values are comma-separated `key=value` lists: a comma inside a value must be
//! doubled, or a path such as `/run/a,b/fs.sock` would inject an option. Every path passed
//! inside an option goes through [`opt_path`].

#[cfg(test)]
use std::ffi::OsStr;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use crate::Accel;

/// The virtio-fs tag of the shared directory.
pub const SHARE_TAG: &str = "vmboxfs";

/// How the guest's vsock device is provided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsockDevice<'a> {
    /// vhost-user, served by vhost-device-vsock on this socket.
    VhostUser(&'a Path),
    /// The kernel's vhost-vsock with this guest CID, through an fd the caller opened and
    /// reserved the CID on (handed to QEMU as `vhostfd`), or opened by QEMU itself.
    Kernel { cid: u32, vhostfd: Option<i32> },
}

/// A guest NIC: a tap QEMU inherits as fd `fd`, and the MAC the guest sees (the pod link's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The tap's fd, inherited by QEMU at this number.
    pub fd: i32,
    /// The guest NIC's MAC.
    pub mac: vmbox_network::Mac,
    /// An fd of `/dev/vhost-net` QEMU inherits for the kernel's vhost-net (the caller
    /// opened it; QEMU never opens the device itself), or none for QEMU's own virtio-net.
    pub vhostfd: Option<i32>,
}

/// virtio-mmio slots of QEMU's microvm machine (its documentation: "up to eight").
pub const MMIO_SLOTS: usize = 8;

/// Everything QEMU's command line depends on.
#[derive(Debug, Clone)]
pub struct QemuArgs<'a> {
    /// The VM's name (checked: `[A-Za-z0-9_.-]`).
    pub name: &'a str,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    /// The guest kernel's command line ([`kernel_append`]).
    pub append: &'a str,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    /// TCG's translation cache in MiB (0: QEMU's default). Ignored under KVM.
    pub tcg_cache_mib: u32,
    /// The socket the host listens on for the guest console (QEMU connects to it).
    pub console: &'a Path,
    /// QEMU's monitor socket (QEMU listens).
    pub qmp: &'a Path,
    /// virtiofsd's socket, when a directory is shared.
    pub fs: Option<&'a Path>,
    pub vsock: VsockDevice<'a>,
    /// The guest's NICs (at most what [`QemuArgs::check_slots`] lets through).
    pub nics: &'a [Nic],
    /// QEMU's seccomp sandbox (`-sandbox` value), when confined.
    pub sandbox: Option<&'a str>,
}

impl QemuArgs<'_> {
    /// virtio-mmio devices the machine needs: balloon, vsock, virtio-fs if any, the NICs.
    pub fn mmio_devices(&self) -> usize {
        2 + usize::from(self.fs.is_some()) + self.nics.len()
    }

    /// Fails, saying what takes the slots, when the devices do not fit microvm's
    /// [`MMIO_SLOTS`].
    pub fn check_slots(&self) -> Result<(), String> {
        let n = self.mmio_devices();
        if n > MMIO_SLOTS {
            return Err(format!(
                "{} network interfaces need {n} virtio-mmio devices with the balloon, vsock and virtio-fs ones; QEMU's microvm has {MMIO_SLOTS}",
                self.nics.len()
            ));
        }
        Ok(())
    }
}

/// A path as a QEMU option value: commas doubled.
pub fn opt_path(p: &Path) -> OsString {
    let mut out = Vec::with_capacity(p.as_os_str().len());
    for &b in p.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn opt(prefix: &str, p: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(opt_path(p));
    s.push(suffix);
    s
}

/// QEMU's arguments (without the binary), vCPUs stopped (`-S`) until released over QMP.
pub fn qemu_args(a: &QemuArgs) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| v.extend(items.iter().map(OsString::from));
    let name = format!("vmbox-{},process=vmbox-{}", a.name, a.name);
    push(&["-name", &name]);
    push(&[
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,acpi=off,memory-backend=mem",
    ]);
    let mem = a.memory_mib;
    push(&["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")]);
    push(&["-m", &format!("{mem}M"), "-smp", &a.vcpus.to_string()]);
    let (accel, cpu) = match (a.accel, a.tcg_cache_mib) {
        (Accel::Tcg, 0) => ("tcg,thread=multi".to_string(), TCG_CPU),
        (Accel::Tcg, mib) => (format!("tcg,thread=multi,tb-size={mib}"), TCG_CPU),
        (Accel::Kvm, _) => ("kvm".to_string(), "host"),
    };
    push(&["-accel", &accel, "-cpu", cpu]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    // Free page reporting: the guest hands memory it freed (the unpacked initramfs, exited
    // processes) back, and QEMU drops it from the host.
    push(&["-device", "virtio-balloon-device,free-page-reporting=on"]);
    v.push("-kernel".into());
    v.push(a.kernel.into());
    v.push("-initrd".into());
    v.push(a.initramfs.into());
    v.push("-append".into());
    v.push(a.append.into());
    // The console goes to a socket the host reads into a bounded buffer (never a file the
    // guest could grow without limit).
    v.push("-chardev".into());
    v.push(opt("socket,id=con,path=", a.console, ""));
    v.extend(["-serial", "chardev:con"].map(OsString::from));
    v.push("-qmp".into());
    v.push(opt("unix:", a.qmp, ",server=on,wait=off"));
    if let Some(fs) = a.fs {
        v.push("-chardev".into());
        v.push(opt("socket,id=fs,path=", fs, ""));
        // QEMU 7.1-8.0 crash when virtiofsd is given --tag: the tag lives on the device.
        v.push("-device".into());
        v.push(format!("vhost-user-fs-device,chardev=fs,tag={SHARE_TAG}").into());
    }
    match &a.vsock {
        VsockDevice::VhostUser(sock) => {
            v.push("-chardev".into());
            v.push(opt("socket,id=vsk,path=", sock, ""));
            v.push("-device".into());
            v.push("vhost-user-vsock-device,chardev=vsk".into());
        }
        VsockDevice::Kernel { cid, vhostfd } => {
            let fd = vhostfd.map(|fd| format!(",vhostfd={fd}")).unwrap_or_default();
            v.push("-device".into());
            v.push(format!("vhost-vsock-device,guest-cid={cid}{fd}").into());
        }
    }
    for (i, nic) in a.nics.iter().enumerate() {
        let vhost = match nic.vhostfd {
            Some(fd) => format!("vhost=on,vhostfd={fd}"),
            None => "vhost=off".into(),
        };
        v.push("-netdev".into());
        v.push(format!("tap,id=net{i},fd={},{vhost}", nic.fd).into());
        v.push("-device".into());
        v.push(format!("virtio-net-device,netdev=net{i},mac={}", nic.mac).into());
    }
    if let Some(sandbox) = a.sandbox {
        v.push("-sandbox".into());
        v.push(sandbox.into());
    }
    v.push("-S".into());
    v
}

/// The guest CPU under TCG: everything QEMU can emulate except ERMS and FSRM ("fast"
/// `rep movsb`/`rep stosb`). TCG runs every iteration of a `rep` string instruction as a
/// translated block of its own, so the byte-wise copies and fills that the guest kernel
/// (`clear_page_erms` on every page fault, `copy_user_enhanced_fast_string`, `memset_erms`)
/// and glibc pick on such a CPU cost several times the qword and vector loops they use
/// without it. `make bench-vm` runs interleaved with and without: create, start, wait and
/// remove of `true` in a warm VM, median 263-293 -> 244-274 ms (docs/benchmarks.md).
/// Under KVM the CPU is the host's.
pub const TCG_CPU: &str = "max,erms=off,fsrm=off";

/// Kernel parameters for a guest under TCG only (`make bench`, docs/benchmarks.md):
/// - `nolapic_timer`: TCG has no TSC-deadline timer, so the kernel would calibrate the
///   local APIC timer against the PIT at every boot: 25 ticks, about 250 ms of wall time
///   here. Without it the PIT's periodic tick drives the clock events; the guest had no
///   high-resolution timers under TCG anyway (its clocksource was jiffies).
/// - `tsc=reliable`: QEMU's TCG TSC is the host's, monotonic and shared by every vCPU,
///   but the kernel's TSC synchronization check between vCPU threads fails under
///   emulation and falls back to the jiffies clocksource (4 ms resolution).
/// - `no_timer_check`: skips the IO-APIC timer IRQ test (about 20 ms).
/// - `noreplace-smp`: a one-vCPU guest would rewrite each of the kernel's 4,000 `lock`
///   prefixes through `text_poke`, two address-space switches each, and every switch
///   empties TCG's TLB: 60-175 ms of boot. Kept locks cost nothing measurable after it
///   (`make bench-vm` interleaved: kernel start to agent ready 727-936 -> 686-720 ms,
///   create+start+wait+remove 227-242 -> 218-223 ms).
///
/// Under KVM none is needed: `-cpu host` exposes the TSC-deadline timer and a stable
/// TSC, and the kernel skips the first three by itself; patching the locks costs far less
/// there and is left to the kernel. [`kernel_append`] adds one more under
/// TCG when the host's TSC frequency is known: `tsc_early_khz`.
pub const TCG_KERNEL_PARAMS: &str = "nolapic_timer tsc=reliable no_timer_check noreplace-smp";

/// The guest kernel's command line. `hostname` must already be valid
/// ([`vmbox_protocol::valid_hostname`]); `extra` is the operator's `vm.kernel_params`.
/// `host_tsc_khz` ([`crate::accel::host_tsc_khz`]) is passed to a TCG guest as
/// `tsc_early_khz`: its TSC is the host's, and the guest then skips calibrating it against
/// the emulated PIT (which fails about one boot in five under TCG, costing a delay-loop
/// calibration and leaving the guest on the jiffies clock). Ignored under KVM, whose
/// guest reads the frequency from kvmclock.
pub fn kernel_append(
    log_level: &str,
    hello_port: u32,
    share: bool,
    hostname: Option<&str>,
    accel: Accel,
    host_tsc_khz: Option<u32>,
    extra: &str,
) -> String {
    let quiet = log_level != "trace";
    let agent_log = if quiet { log_level } else { "debug" };
    let mut append = format!(
        "console=ttyS0 reboot=t panic=-1 {}vmbox.log={agent_log} vmbox.hello_port={hello_port}",
        if quiet { "quiet " } else { "" }
    );
    if accel == Accel::Tcg {
        append.push(' ');
        append.push_str(TCG_KERNEL_PARAMS);
        if let Some(khz) = host_tsc_khz {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    if share {
        append.push_str(&format!(" vmbox.share={SHARE_TAG}"));
    }
    if let Some(h) = hostname {
        append.push_str(&format!(" vmbox.hostname={h}"));
    }
    if !extra.is_empty() {
        append.push(' ');
        append.push_str(extra);
    }
    append
}

/// Whether `name` may name a VM: 1-256 of `[A-Za-z0-9_.-]` (no comma, no space).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The values following `flag` in `args`.
#[cfg(test)]
fn arg_after<'a>(args: &'a [OsString], flag: &str) -> Vec<&'a OsStr> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_os_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args<'a>(accel: Accel, vsock: VsockDevice<'a>, fs: Option<&'a Path>) -> QemuArgs<'a> {
        QemuArgs {
            name: "k8s.io-abc",
            kernel: Path::new("/k/vmlinux"),
            initramfs: Path::new("/k/initramfs.img"),
            append: "console=ttyS0",
            memory_mib: 256,
            vcpus: 2,
            accel,
            tcg_cache_mib: 64,
            console: Path::new("/run/v/con.sock"),
            qmp: Path::new("/run/v/qmp.sock"),
            fs,
            vsock,
            nics: &[],
            sandbox: None,
        }
    }

    fn strs(v: &[&OsStr]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn a_comma_in_a_path_cannot_inject_an_option() {
        let fs = Path::new("/run/a,server=on/fs.sock");
        let a = args(
            Accel::Tcg,
            VsockDevice::VhostUser(Path::new("/run/x,y/v.sock")),
            Some(fs),
        );
        let v = qemu_args(&a);
        let chardevs = strs(&arg_after(&v, "-chardev"));
        assert!(
            chardevs.contains(&"socket,id=fs,path=/run/a,,server=on/fs.sock".to_string()),
            "{chardevs:?}"
        );
        assert!(
            chardevs.contains(&"socket,id=vsk,path=/run/x,,y/v.sock".to_string()),
            "{chardevs:?}"
        );
    }

    #[test]
    fn tcg_gets_its_cache_and_a_generic_cpu_kvm_the_host_cpu() {
        let v = qemu_args(&args(Accel::Tcg, VsockDevice::VhostUser(Path::new("/v")), None));
        assert_eq!(strs(&arg_after(&v, "-accel")), ["tcg,thread=multi,tb-size=64"]);
        assert_eq!(strs(&arg_after(&v, "-cpu")), ["max,erms=off,fsrm=off"]);
        let v = qemu_args(&args(Accel::Kvm, VsockDevice::VhostUser(Path::new("/v")), None));
        assert_eq!(strs(&arg_after(&v, "-accel")), ["kvm"]);
        assert_eq!(strs(&arg_after(&v, "-cpu")), ["host"]);
        assert_eq!(
            v.last().map(|s| s.as_os_str()),
            Some(OsStr::new("-S")),
            "vCPUs start stopped"
        );
    }

    #[test]
    fn the_vsock_device_follows_the_transport() {
        let v = qemu_args(&args(
            Accel::Kvm,
            VsockDevice::Kernel {
                cid: 77,
                vhostfd: Some(9),
            },
            None,
        ));
        assert!(strs(&arg_after(&v, "-device")).contains(&"vhost-vsock-device,guest-cid=77,vhostfd=9".to_string()));
        assert!(arg_after(&v, "-chardev")
            .iter()
            .all(|c| !c.to_string_lossy().contains("vsk")));
        let v = qemu_args(&args(Accel::Kvm, VsockDevice::VhostUser(Path::new("/v.sock")), None));
        assert!(strs(&arg_after(&v, "-device")).contains(&"vhost-user-vsock-device,chardev=vsk".to_string()));
    }

    #[test]
    fn each_nic_is_a_tap_fd_with_the_pods_mac_within_the_mmio_slots() {
        let nics = [
            Nic {
                fd: 7,
                mac: vmbox_network::Mac([2, 0x42, 10, 88, 0, 5]),
                vhostfd: None,
            },
            Nic {
                fd: 8,
                mac: vmbox_network::Mac([2, 0x42, 10, 88, 0, 6]),
                vhostfd: Some(11),
            },
        ];
        let mut a = args(
            Accel::Tcg,
            VsockDevice::VhostUser(Path::new("/v")),
            Some(Path::new("/fs")),
        );
        a.nics = &nics;
        let v = qemu_args(&a);
        assert_eq!(
            strs(&arg_after(&v, "-netdev")),
            ["tap,id=net0,fd=7,vhost=off", "tap,id=net1,fd=8,vhost=on,vhostfd=11"]
        );
        let devices = strs(&arg_after(&v, "-device"));
        assert!(devices.contains(&"virtio-net-device,netdev=net0,mac=02:42:0a:58:00:05".to_string()));
        assert!(devices.contains(&"virtio-net-device,netdev=net1,mac=02:42:0a:58:00:06".to_string()));
        assert_eq!(a.mmio_devices(), 5);
        assert!(a.check_slots().is_ok());
        let many = vec![nics[0].clone(); 6];
        a.nics = &many;
        let e = a.check_slots().unwrap_err();
        assert!(e.contains("6 network interfaces") && e.contains("9 virtio-mmio"), "{e}");
    }

    #[test]
    fn a_confined_qemu_gets_its_seccomp_sandbox() {
        let mut a = args(Accel::Tcg, VsockDevice::VhostUser(Path::new("/v")), None);
        assert!(arg_after(&qemu_args(&a), "-sandbox").is_empty());
        a.sandbox = Some(vmbox_config::DEFAULT_QEMU_SANDBOX);
        assert_eq!(
            strs(&arg_after(&qemu_args(&a), "-sandbox")),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
    }

    #[test]
    fn the_share_and_console_are_wired() {
        let v = qemu_args(&args(
            Accel::Tcg,
            VsockDevice::VhostUser(Path::new("/v")),
            Some(Path::new("/fs")),
        ));
        assert!(strs(&arg_after(&v, "-device")).contains(&"vhost-user-fs-device,chardev=fs,tag=vmboxfs".to_string()));
        assert!(strs(&arg_after(&v, "-chardev")).contains(&"socket,id=con,path=/run/v/con.sock".to_string()));
        assert_eq!(strs(&arg_after(&v, "-serial")), ["chardev:con"]);
        let v = qemu_args(&args(Accel::Tcg, VsockDevice::VhostUser(Path::new("/v")), None));
        assert!(strs(&arg_after(&v, "-device"))
            .iter()
            .all(|d| !d.contains("vhost-user-fs")));
    }

    #[test]
    fn the_kernel_command_line_carries_port_share_hostname_and_extras() {
        let a = kernel_append(
            "info",
            1030,
            true,
            Some("node-1"),
            Accel::Kvm,
            Some(2_100_000),
            "foo=bar",
        );
        assert_eq!(
            a,
            "console=ttyS0 reboot=t panic=-1 quiet vmbox.log=info vmbox.hello_port=1030 vmbox.share=vmboxfs vmbox.hostname=node-1 foo=bar"
        );
        let a = kernel_append("info", 1030, false, None, Accel::Tcg, Some(2_099_999), "");
        assert_eq!(
            a,
            "console=ttyS0 reboot=t panic=-1 quiet vmbox.log=info vmbox.hello_port=1030 nolapic_timer tsc=reliable no_timer_check noreplace-smp tsc_early_khz=2099999"
        );
        let a = kernel_append("info", 1030, false, None, Accel::Tcg, None, "");
        assert_eq!(
            a,
            "console=ttyS0 reboot=t panic=-1 quiet vmbox.log=info vmbox.hello_port=1030 nolapic_timer tsc=reliable no_timer_check noreplace-smp"
        );
        let a = kernel_append("trace", 1024, false, None, Accel::Kvm, None, "");
        assert_eq!(
            a,
            "console=ttyS0 reboot=t panic=-1 vmbox.log=debug vmbox.hello_port=1024"
        );
    }

    #[test]
    fn vm_names_are_checked() {
        assert!(valid_name("k8s.io-0123abc_x"));
        assert!(valid_name(&format!("{}-{}", "n".repeat(76), "f".repeat(128))));
        for bad in ["", "a,b", "a b", "a/b", "a=b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
