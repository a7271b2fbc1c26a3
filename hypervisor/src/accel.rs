//! Choosing QEMU's accelerator. QEMU will not fall back from KVM to TCG by itself
//! (`-accel kvm:tcg` is rejected), and some hosts have a /dev/kvm that cannot run an
//! ordinary guest (PVM, a software hypervisor: `/sys/module/kvm_pvm`), so decide here.

use vmbox_config::Accelerator;

/// The accelerator actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the host offers, read from /dev, /sys and /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    pub dev_kvm: bool,
    pub kvm_pvm: bool,
    pub cpu_virt: bool,
}

impl HostFacts {
    pub fn probe() -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostFacts {
            dev_kvm: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            kvm_pvm: std::path::Path::new("/sys/module/kvm_pvm").exists(),
            cpu_virt: cpuinfo
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm")),
        }
    }
}

/// Picks the accelerator and says why.
pub fn choose(wanted: Accelerator, host: &HostFacts) -> (Accel, String) {
    match wanted {
        Accelerator::Kvm => (Accel::Kvm, "forced by config (vm.accelerator = \"kvm\")".into()),
        Accelerator::Tcg => (Accel::Tcg, "forced by config (vm.accelerator = \"tcg\")".into()),
        Accelerator::Auto if host.kvm_pvm => (
            Accel::Tcg,
            "/dev/kvm is PVM (/sys/module/kvm_pvm), which cannot run the guest kernel".into(),
        ),
        Accelerator::Auto if !host.cpu_virt => (Accel::Tcg, "the CPU has no vmx/svm".into()),
        Accelerator::Auto if !host.dev_kvm => (Accel::Tcg, "/dev/kvm is missing or not accessible".into()),
        Accelerator::Auto => (Accel::Kvm, "/dev/kvm is usable and the CPU has vmx/svm".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(dev_kvm: bool, kvm_pvm: bool, cpu_virt: bool) -> HostFacts {
        HostFacts {
            dev_kvm,
            kvm_pvm,
            cpu_virt,
        }
    }

    #[test]
    fn auto_prefers_kvm_only_when_it_is_real() {
        assert_eq!(choose(Accelerator::Auto, &facts(true, false, true)).0, Accel::Kvm);
        assert_eq!(choose(Accelerator::Auto, &facts(true, true, true)).0, Accel::Tcg);
        assert_eq!(choose(Accelerator::Auto, &facts(true, false, false)).0, Accel::Tcg);
        assert_eq!(choose(Accelerator::Auto, &facts(false, false, true)).0, Accel::Tcg);
    }

    #[test]
    fn config_forces_either() {
        assert_eq!(choose(Accelerator::Kvm, &facts(false, true, false)).0, Accel::Kvm);
        assert_eq!(choose(Accelerator::Tcg, &facts(true, false, true)).0, Accel::Tcg);
    }
}
