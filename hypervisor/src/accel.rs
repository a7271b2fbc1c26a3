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
            cpu_virt: cpu_has(&cpuinfo, "vmx") || cpu_has(&cpuinfo, "svm"),
        }
    }
}

/// Whether a `flags` line of `cpuinfo` (the text of /proc/cpuinfo) names `flag`.
fn cpu_has(cpuinfo: &str, flag: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == flag))
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

/// The host's TSC frequency in kHz, or `None` when the host has no invariant TSC that its
/// kernel trusts (`constant_tsc` and `nonstop_tsc` in /proc/cpuinfo, and `tsc` as the
/// current clocksource, so the TSCs of all CPUs agree), is not x86-64, or the measurement
/// is unreliable (a reading whose clock reads were more than [`TSC_MAX_GAP_NS`] apart,
/// as when the thread was preempted) or implausible (outside 100 MHz..20 GHz).
///
/// Under TCG the guest's TSC is the host's (QEMU answers `rdtsc` with the host's counter),
/// so the guest can be told its frequency (`tsc_early_khz`) instead of calibrating it
/// against the emulated PIT, which under emulation fails about one boot in five and then
/// costs the guest a delay-loop calibration and leaves it on the 4 ms jiffies clock.
///
/// Measured once per process against `CLOCK_MONOTONIC_RAW` over [`TSC_WINDOW`] (the
/// thread sleeps meanwhile): at each end, the reading of three whose clock reads are
/// closest together, so the error is a few tens of ppm, as good as the guest's own PIT
/// calibration when it works. Blocks for about 5 ms on the first call.
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let clocksource =
            std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource").ok()?;
        if !(cpu_has(&cpuinfo, "constant_tsc") && cpu_has(&cpuinfo, "nonstop_tsc")) || clocksource.trim() != "tsc" {
            return None;
        }
        let (tsc0, ns0) = tsc_and_clock()?;
        std::thread::sleep(TSC_WINDOW);
        let (tsc1, ns1) = tsc_and_clock()?;
        let khz = tsc1.checked_sub(tsc0)? as u128 * 1_000_000 / ns1.checked_sub(ns0)?.max(1) as u128;
        (100_000..=20_000_000).contains(&khz).then_some(khz as u32)
    })
}

/// How long [`host_tsc_khz`] measures.
pub const TSC_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// The widest gap, in ns, between the two clock reads around a TSC reading that
/// [`host_tsc_khz`] accepts: 20 us over [`TSC_WINDOW`] bounds its error at 0.4%, and an
/// undisturbed reading takes well under 1 us.
pub const TSC_MAX_GAP_NS: u64 = 20_000;

/// A TSC reading and the `CLOCK_MONOTONIC_RAW` time at it, in ns: of three tries, the one
/// whose two clock reads around the `rdtsc` are closest; `None` if even those are more
/// than [`TSC_MAX_GAP_NS`] apart.
#[cfg(target_arch = "x86_64")]
fn tsc_and_clock() -> Option<(u64, u64)> {
    use nix::time::{clock_gettime, ClockId};
    let ns = |t: nix::sys::time::TimeSpec| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64;
    let mut best: Option<(u64, u64, u64)> = None;
    for _ in 0..3 {
        let before = ns(clock_gettime(ClockId::CLOCK_MONOTONIC_RAW).ok()?);
        // SAFETY: rdtsc has no preconditions on x86-64.
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        let after = ns(clock_gettime(ClockId::CLOCK_MONOTONIC_RAW).ok()?);
        let gap = after.checked_sub(before)?;
        if best.is_none_or(|(g, _, _)| gap < g) {
            best = Some((gap, tsc, before + gap / 2));
        }
    }
    best.filter(|&(gap, _, _)| gap <= TSC_MAX_GAP_NS)
        .map(|(_, tsc, at)| (tsc, at))
}

#[cfg(not(target_arch = "x86_64"))]
fn tsc_and_clock() -> Option<(u64, u64)> {
    None
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
    fn the_host_tsc_frequency_is_measured_or_absent() {
        // This host (and any CI host) has an invariant TSC between 1 and 6 GHz.
        if let Some(khz) = host_tsc_khz() {
            assert!((1_000_000..6_000_000).contains(&khz), "{khz} kHz");
            // The host kernel's BogoMIPS derive from its own TSC calibration (kHz / 500).
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let bogomips = cpuinfo
                .lines()
                .find(|l| l.starts_with("bogomips"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok());
            if let Some(b) = bogomips {
                let off = (f64::from(khz) - b * 500.0).abs() / f64::from(khz);
                assert!(
                    off < 0.01,
                    "measured {khz} kHz, the host kernel's {b} BogoMIPS say {}",
                    b * 500.0
                );
            }
            // A second call returns the first measurement.
            assert_eq!(host_tsc_khz(), Some(khz));
        }
    }

    #[test]
    fn config_forces_either() {
        assert_eq!(choose(Accelerator::Kvm, &facts(false, true, false)).0, Accel::Kvm);
        assert_eq!(choose(Accelerator::Tcg, &facts(true, false, true)).0, Accel::Tcg);
    }
}
