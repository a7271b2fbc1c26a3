//! How big a sandbox's VM is.
//!
//! A VM cannot grow after boot here (microvm has no CPU or memory hotplug), so it is sized
//! once, from the first container's spec (Kata's "static sandbox resource management"):
//!
//! - **Pod** (CRI sandbox): what the pod asks for, from containerd's sandbox annotations
//!   ([`ANN_SANDBOX_CPU_QUOTA`]/[`ANN_SANDBOX_CPU_PERIOD`], else [`ANN_SANDBOX_CPU_SHARES`];
//!   [`ANN_SANDBOX_MEMORY`]), i.e. the sum of its containers' limits.
//! - **Lone container** (`ctr run`): its own `linux.resources` (CPU quota/period, memory
//!   limit; not its shares, which containerd sets to 1024 for every container).
//! - vCPUs = `vm.vcpus` + ceil(quota / period) (or ceil(shares / 1024) when there is no
//!   quota); memory MiB = `vm.memory_mib` + ceil(limit / 1 MiB). The configured size is
//!   the overhead: the guest kernel and agent live in it, so what the pod asks for stays
//!   its own.
//! - Both within `vm.max_vcpus` (0: the host's CPUs) and `vm.max_memory_mib` (0: the
//!   host's memory).
//! - `io.vmbox.vcpus` / `io.vmbox.memory_mib` replace the computed figure (still bounded).

use std::collections::HashMap;

use oci_spec::runtime::Spec;
use vmbox_config::VmConfig;

use crate::{OciError, ANN_SANDBOX_CPU_PERIOD, ANN_SANDBOX_CPU_QUOTA, ANN_SANDBOX_CPU_SHARES, ANN_SANDBOX_MEMORY};

/// What a pod or container asks for; `None`/0 is "nothing".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    /// CFS quota in µs per period; <= 0 is unlimited.
    pub cpu_quota: Option<i64>,
    /// CFS period in µs.
    pub cpu_period: Option<u64>,
    /// CPU shares (1024 per CPU).
    pub cpu_shares: Option<u64>,
    /// Memory limit in bytes; <= 0 is unlimited.
    pub memory_bytes: Option<i64>,
}

impl Request {
    /// CRI's sandbox annotations; a value that is not a number is an error naming it.
    pub fn from_annotations(map: &HashMap<String, String>) -> Result<Request, OciError> {
        fn num<T: std::str::FromStr>(map: &HashMap<String, String>, key: &'static str) -> Result<Option<T>, OciError> {
            map.get(key)
                .map(|v| {
                    v.trim().parse().map_err(|_| OciError::Annotation {
                        key,
                        value: v.clone(),
                        reason: "expected a whole number".into(),
                    })
                })
                .transpose()
        }
        Ok(Request {
            cpu_quota: num(map, ANN_SANDBOX_CPU_QUOTA)?,
            cpu_period: num(map, ANN_SANDBOX_CPU_PERIOD)?,
            cpu_shares: num(map, ANN_SANDBOX_CPU_SHARES)?,
            memory_bytes: num(map, ANN_SANDBOX_MEMORY)?,
        })
    }

    /// A lone container's own `linux.resources`: its limits (CPU quota/period, memory).
    /// Not its shares: containerd's default spec gives every container 1024, a weight, not
    /// a request for a CPU.
    pub fn from_spec(spec: &Spec) -> Request {
        let Some(r) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) else {
            return Request::default();
        };
        let cpu = r.cpu().as_ref();
        Request {
            cpu_quota: cpu.and_then(|c| c.quota()),
            cpu_period: cpu.and_then(|c| c.period()),
            cpu_shares: None,
            memory_bytes: r.memory().as_ref().and_then(|m| m.limit()),
        }
    }

    /// Whole CPUs asked for: ceil(quota / period), else ceil(shares / 1024) above the
    /// minimum shares (2, a best-effort pod's).
    pub fn cpus(&self) -> u32 {
        match (self.cpu_quota, self.cpu_period) {
            (Some(q), Some(p)) if q > 0 && p > 0 => return (q as u64).div_ceil(p).min(u32::MAX as u64) as u32,
            _ => {}
        }
        match self.cpu_shares {
            Some(s) if s > 2 => s.div_ceil(1024).min(u32::MAX as u64) as u32,
            _ => 0,
        }
    }

    /// MiB asked for: ceil(limit / 1 MiB).
    pub fn memory_mib(&self) -> u32 {
        match self.memory_bytes {
            Some(b) if b > 0 => (b as u64).div_ceil(1 << 20).min(u32::MAX as u64) as u32,
            _ => 0,
        }
    }
}

/// A sandbox VM's size and how it was reached (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub why: String,
}

/// What bounds a VM by default (`vm.max_vcpus`/`vm.max_memory_mib` = 0): the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// Online CPUs.
    pub cpus: u32,
    /// MemTotal, MiB.
    pub memory_mib: u32,
}

impl Host {
    /// This host (`available_parallelism`, /proc/meminfo); 1 CPU and no memory bound
    /// below [`vmbox_config::MAX_MEMORY_MIB`] where they cannot be read.
    pub fn probe() -> Host {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| (kib / 1024).min(vmbox_config::MAX_MEMORY_MIB as u64) as u32)
            .unwrap_or(vmbox_config::MAX_MEMORY_MIB);
        Host { cpus, memory_mib }
    }
}

/// Sizes the VM of a sandbox whose first container has `spec` and `ann`, on `host`. See
/// the module's rules.
pub fn vm_size(spec: &Spec, ann: &crate::Annotations, vm: &VmConfig, host: Host) -> VmSize {
    let (request, from) = if ann.sandbox_id.is_some() {
        (ann.pod_resources, "the pod's CRI annotations")
    } else {
        (Request::from_spec(spec), "the container's linux.resources")
    };
    let max_vcpus = match vm.max_vcpus {
        0 => host.cpus.max(1),
        n => n,
    }
    .max(vm.vcpus);
    let max_memory = match vm.max_memory_mib {
        0 => host.memory_mib,
        n => n,
    }
    .max(vm.memory_mib);
    let mut why = Vec::new();
    let vcpus = match ann.vcpus {
        Some(v) => {
            why.push(format!("{} vCPUs from io.vmbox.vcpus", v));
            v
        }
        None => {
            let asked = request.cpus();
            why.push(format!("{} + {asked} vCPUs asked by {from}", vm.vcpus));
            vm.vcpus.saturating_add(asked)
        }
    };
    let memory_mib = match ann.memory_mib {
        Some(m) => {
            why.push(format!("{m} MiB from io.vmbox.memory_mib"));
            m
        }
        None => {
            let asked = request.memory_mib();
            why.push(format!("{} + {asked} MiB asked by {from}", vm.memory_mib));
            vm.memory_mib.saturating_add(asked)
        }
    };
    if vcpus > max_vcpus {
        why.push(format!("vCPUs bounded to {max_vcpus}"));
    }
    if memory_mib > max_memory {
        why.push(format!("memory bounded to {max_memory} MiB"));
    }
    VmSize {
        vcpus: vcpus.min(max_vcpus),
        memory_mib: memory_mib.min(max_memory),
        why: why.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Annotations;

    fn pod(pairs: &[(&str, &str)]) -> Annotations {
        let mut m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        m.insert(crate::ANN_SANDBOX_ID.into(), "pod".into());
        Annotations::parse(Some(&m)).unwrap()
    }

    fn size(ann: &Annotations, vm: &VmConfig) -> (u32, u32) {
        let s = vm_size(
            &Spec::default(),
            ann,
            vm,
            Host {
                cpus: 8,
                memory_mib: 16384,
            },
        );
        (s.vcpus, s.memory_mib)
    }

    #[test]
    fn a_pod_gets_what_it_asks_plus_the_overhead() {
        let vm = VmConfig::default(); // 1 vCPU, 256 MiB
        let a = pod(&[
            (ANN_SANDBOX_CPU_QUOTA, "150000"),
            (ANN_SANDBOX_CPU_PERIOD, "100000"),
            (ANN_SANDBOX_MEMORY, "536870912"),
        ]);
        assert_eq!(size(&a, &vm), (3, 768));
        // Requests only: shares.
        assert_eq!(size(&pod(&[(ANN_SANDBOX_CPU_SHARES, "2048")]), &vm), (3, 256));
        // A best-effort pod (minimum shares, unlimited quota) gets the configured size.
        let be = pod(&[
            (ANN_SANDBOX_CPU_SHARES, "2"),
            (ANN_SANDBOX_CPU_QUOTA, "-1"),
            (ANN_SANDBOX_CPU_PERIOD, "100000"),
        ]);
        assert_eq!(size(&be, &vm), (1, 256));
    }

    #[test]
    fn bounds_and_overrides_apply() {
        let vm = VmConfig {
            max_vcpus: 2,
            max_memory_mib: 512,
            ..VmConfig::default()
        };
        let big = pod(&[
            (ANN_SANDBOX_CPU_QUOTA, "800000"),
            (ANN_SANDBOX_CPU_PERIOD, "100000"),
            (ANN_SANDBOX_MEMORY, "4294967296"),
        ]);
        assert_eq!(size(&big, &vm), (2, 512));
        let mut o = pod(&[(crate::ANN_VCPUS, "2"), (crate::ANN_MEMORY_MIB, "300")]);
        assert_eq!(size(&o, &VmConfig::default()), (2, 300));
        o.vcpus = Some(16);
        o.memory_mib = Some(65536);
        assert_eq!(
            size(&o, &VmConfig::default()),
            (8, 16384),
            "max_vcpus and max_memory_mib 0 are the host's 8 CPUs and 16 GiB"
        );
    }

    #[test]
    fn a_lone_containers_default_shares_ask_for_nothing() {
        // containerd's default spec (ctr run): shares 1024, no quota, no limit.
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"resources": {"cpu": {"shares": 1024}}}
        }))
        .unwrap();
        let s = vm_size(
            &spec,
            &Annotations::default(),
            &VmConfig::default(),
            Host {
                cpus: 8,
                memory_mib: 16384,
            },
        );
        assert_eq!((s.vcpus, s.memory_mib), (1, 256), "{}", s.why);
    }

    #[test]
    fn a_lone_container_is_sized_from_its_own_resources() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"resources": {"cpu": {"quota": 200000, "period": 100000}, "memory": {"limit": 134217728}}}
        }))
        .unwrap();
        let s = vm_size(
            &spec,
            &Annotations::default(),
            &VmConfig::default(),
            Host {
                cpus: 8,
                memory_mib: 16384,
            },
        );
        assert_eq!((s.vcpus, s.memory_mib), (3, 384), "{}", s.why);
    }

    #[test]
    fn a_bad_number_names_the_annotation() {
        let m: HashMap<String, String> = [(ANN_SANDBOX_MEMORY.to_string(), "lots".to_string())].into();
        let e = Annotations::parse(Some(&m)).unwrap_err().to_string();
        assert!(e.contains(ANN_SANDBOX_MEMORY) && e.contains("lots"), "{e}");
    }
}
