//! From the OCI runtime spec containerd hands the shim (written for the host) to the spec
//! the guest agent runs.
//!
//! - [`load_spec`]: reads a bundle's config.json; a bad file is an error naming it.
//! - [`Annotations`]: the annotations vmbox understands (sandbox grouping, VM size);
//!   an out-of-range value is an error naming the annotation.
//! - [`to_guest`]: drops what only means something on the host (namespace paths, cgroup
//!   paths, host devices, hooks) and maps bind mounts to paths in the shared directory.
//!
//! Never touches the filesystem beyond reading config.json and checking bind sources.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use vmbox_config::{MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB};
use vmbox_protocol::GUEST_SHARED_MOUNT;

pub const ANN_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const ANN_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const ANN_VCPUS: &str = "io.vmbox.vcpus";
pub const ANN_MEMORY_MIB: &str = "io.vmbox.memory_mib";
/// containerd's CRI (1.6.20 on): the pod's CPU limit as a CFS quota and period (µs),
/// and its memory limit (bytes), on the sandbox container's spec.
pub const ANN_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const ANN_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// The pod's CPU request as shares (containerd 1.7 on; read when present).
pub const ANN_SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
pub const ANN_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

pub mod cgroup;
pub mod sizing;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid OCI runtime spec: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("annotation {key}={value:?}: {reason}")]
    Annotation {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("spec field {field}: {reason}")]
    Field { field: String, reason: String },
}

/// Reads `bundle/config.json`.
pub fn load_spec(bundle: &Path) -> Result<Spec, OciError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| OciError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|e| OciError::Parse {
        path,
        detail: e.to_string(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContainerType {
    /// The pod's sandbox (pause) container, or a lone container.
    #[default]
    Sandbox,
    /// A container joining an existing sandbox.
    Container,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Annotations {
    /// The sandbox the container belongs to; `None` for a container that is its own sandbox.
    pub sandbox_id: Option<String>,
    pub container_type: ContainerType,
    /// `io.vmbox.vcpus`: an explicit vCPU count (overrides sizing).
    pub vcpus: Option<u32>,
    /// `io.vmbox.memory_mib`: an explicit memory size (overrides sizing).
    pub memory_mib: Option<u32>,
    /// What the pod asks for (CRI's sandbox annotations); see [`sizing`].
    pub pod_resources: sizing::Request,
}

impl Annotations {
    pub fn parse(map: Option<&HashMap<String, String>>) -> Result<Annotations, OciError> {
        let empty = HashMap::new();
        let map = map.unwrap_or(&empty);
        let container_type = match map.get(ANN_CONTAINER_TYPE).map(String::as_str) {
            None | Some("sandbox") => ContainerType::Sandbox,
            Some("container") => ContainerType::Container,
            Some(v) => {
                return Err(OciError::Annotation {
                    key: ANN_CONTAINER_TYPE,
                    value: v.into(),
                    reason: "expected \"sandbox\" or \"container\"".into(),
                })
            }
        };
        let number = |key: &'static str, min: u32, max: u32| -> Result<Option<u32>, OciError> {
            let Some(v) = map.get(key) else { return Ok(None) };
            let bad = |reason: String| OciError::Annotation {
                key,
                value: v.clone(),
                reason,
            };
            let n: u64 = v.trim().parse().map_err(|_| bad("expected a whole number".into()))?;
            if n < min as u64 || n > max as u64 {
                return Err(bad(format!("expected {min} to {max}")));
            }
            Ok(Some(n as u32))
        };
        let sandbox_id = map.get(ANN_SANDBOX_ID).cloned().filter(|s| !s.is_empty());
        if let Some(id) = &sandbox_id {
            if !valid_id(id) {
                return Err(OciError::Annotation {
                    key: ANN_SANDBOX_ID,
                    value: id.clone(),
                    reason: "expected 1-128 of [A-Za-z0-9_.-]".into(),
                });
            }
        }
        Ok(Annotations {
            sandbox_id,
            container_type,
            vcpus: number(ANN_VCPUS, 1, MAX_VCPUS)?,
            memory_mib: number(ANN_MEMORY_MIB, MIN_MEMORY_MIB, MAX_MEMORY_MIB)?,
            pod_resources: sizing::Request::from_annotations(map)?,
        })
    }
}

/// Ids become file names and QEMU options: the protocol's one rule.
pub use vmbox_protocol::valid_id;

/// A host path the guest needs: bind-mount `source` at `share_rel` in the shared directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBind {
    pub source: PathBuf,
    /// Relative to the sandbox's shared directory.
    pub share_rel: String,
    pub readonly: bool,
}

/// The guest's spec and the host binds it relies on.
#[derive(Debug)]
pub struct GuestSpec {
    pub spec: Spec,
    pub binds: Vec<SharedBind>,
    /// What the container shares with its pod; `None` for a lone container.
    pub pod: Option<GuestPod>,
}

/// What a container of a Kubernetes pod shares with the rest of the pod inside the guest
/// (the agent's `PodShare`). Kata's runtime-rs and agent do the same: containerd's CRI
/// names the sandbox's namespaces by host paths (`/proc/<sandbox task pid>/ns/ipc`),
/// which mean nothing in the guest; there the sandbox (pause) container's own
/// namespaces are joined instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPod {
    /// The pod's sandbox container id (`io.kubernetes.cri.sandbox-id`).
    pub sandbox_id: String,
    /// Namespace types ("ipc", "uts", "pid") the container joins from the sandbox
    /// container: those CRI gave a path (IPC and UTS always; PID in the POD mode).
    pub namespaces: Vec<String>,
    /// Size of the pod's /dev/shm tmpfs in the guest, bytes; 0 if the spec mounts none.
    pub shm_bytes: u64,
}

/// /dev/shm size when the host's source is not a tmpfs whose size can be read: CRI's
/// default (`size=65536k`).
pub const DEFAULT_SHM_BYTES: u64 = 64 << 20;

/// The size of the tmpfs at `source` (CRI's per-sandbox shm mount), or
/// [`DEFAULT_SHM_BYTES`] if it is not a tmpfs.
fn shm_size(source: &Path) -> u64 {
    match nix::sys::statfs::statfs(source) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC && s.blocks() > 0 => {
            s.blocks().saturating_mul(s.block_size() as u64)
        }
        _ => DEFAULT_SHM_BYTES,
    }
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Filesystems the guest kernel makes from nothing, which a spec may mount as runc would.
/// Anything else (a block device, NFS, a FUSE daemon) names something that exists on
/// the host only.
pub const GUEST_FILESYSTEMS: &[&str] = &[
    "tmpfs",
    "proc",
    "sysfs",
    "mqueue",
    "devpts",
    "cgroup",
    "cgroup2",
    "ramfs",
    "devtmpfs",
    "securityfs",
    "debugfs",
    "tracefs",
    "bpf",
    "hugetlbfs",
    "configfs",
    "pstore",
    "fusectl",
];

/// Checks a non-bind mount and gives it the source runc would pass: the kernel ignores
/// the source of these filesystems, and runc passes an empty one, which libcontainer
/// refuses (`--mount type=tmpfs,dst=/data` failed with "failed to prepare rootfs").
fn guest_filesystem(i: usize, m: &mut oci_spec::runtime::Mount) -> Result<(), OciError> {
    let Some(typ) = m.typ().clone().filter(|t| !t.is_empty()) else {
        return Err(OciError::Field {
            field: format!("mounts[{i}].type"),
            reason: format!(
                "mount at {} has no type and is not a bind mount",
                m.destination().display()
            ),
        });
    };
    if !GUEST_FILESYSTEMS.contains(&typ.as_str()) {
        return Err(OciError::Field {
            field: format!("mounts[{i}].type"),
            reason: format!(
                "{typ} mount at {} (source {}) cannot be made inside the VM: only bind mounts and \
                 {} reach the guest",
                m.destination().display(),
                m.source()
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "none".into()),
                GUEST_FILESYSTEMS.join(", ")
            ),
        });
    }
    if m.source().as_deref().is_none_or(|s| s.as_os_str().is_empty()) {
        m.set_source(Some(PathBuf::from(&typ)));
    }
    Ok(())
}

/// The network a sandbox's VM gets, from its first container's `linux.namespaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetwork {
    /// A network namespace with a path (a CRI pod after CNI ADD, `ctr run --with-ns
    /// network:<path>`): its addressed links become the guest's NICs.
    Namespace(PathBuf),
    /// A new, empty namespace (`ctr run` without CNI): loopback only, as runc gives.
    Loopback,
    /// No network namespace: the host's network (`ctr run --net-host`, hostNetwork pods).
    /// A VM cannot share the host's network stack: the guest gets loopback only (logged).
    Host,
}

/// [`PodNetwork`] of `spec`.
pub fn pod_network(spec: &Spec) -> PodNetwork {
    use oci_spec::runtime::LinuxNamespaceType as T;
    let ns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == T::Network));
    match ns {
        None => PodNetwork::Host,
        Some(n) => match n.path() {
            Some(p) if !p.as_os_str().is_empty() => PodNetwork::Namespace(p.clone()),
            _ => PodNetwork::Loopback,
        },
    }
}

/// Translates `spec` for container `id`, whose shared files live under `id/` in the share.
///
/// Namespaces: the network entry is dropped (every container uses the guest's network
/// namespace, where the VM's NIC lives); for a container of a pod (`ann.sandbox_id`),
/// IPC, UTS and PID entries that name a path (CRI's way to say "the sandbox's") become
/// [`GuestPod::namespaces`]; every other path is cleared (a host namespace cannot reach
/// the guest: a fresh one is made). A pod's /dev/shm bind becomes the pod's guest tmpfs.
///
/// Errors name the spec field: a missing `process`, empty `process.args`, a bind without
/// a source or whose source does not exist, a mount the guest cannot make.
pub fn to_guest(spec: &Spec, id: &str, ann: &Annotations) -> Result<GuestSpec, OciError> {
    let mut spec = spec.clone();
    if spec.process().is_none() {
        return Err(OciError::Field {
            field: "process".into(),
            reason: "missing".into(),
        });
    }
    if let Some(args) = spec.process().as_ref().and_then(|p| p.args().clone()) {
        if args.is_empty() {
            return Err(OciError::Field {
                field: "process.args".into(),
                reason: "empty".into(),
            });
        }
    }
    let mut binds = Vec::new();
    let mut pod = ann.sandbox_id.as_ref().map(|s| GuestPod {
        sandbox_id: s.clone(),
        namespaces: Vec::new(),
        shm_bytes: 0,
    });
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for (i, m) in mounts.iter_mut().enumerate() {
        if !is_bind(m) {
            guest_filesystem(i, m)?;
            continue;
        }
        let source = m.source().clone().ok_or_else(|| OciError::Field {
            field: format!("mounts[{i}].source"),
            reason: "a bind mount needs a source".into(),
        })?;
        if let Some(pod) = pod.as_mut().filter(|_| m.destination() == Path::new("/dev/shm")) {
            // One tmpfs per pod in the guest: the host's (CRI's) cannot be shared memory
            // across the VM boundary, and CRI unmounts it before it stops the sandbox.
            pod.shm_bytes = shm_size(&source);
            m.set_source(Some(Path::new(vmbox_protocol::POD_SHM_DIR).join(&pod.sandbox_id)));
            continue;
        }
        if !source.exists() {
            return Err(OciError::Field {
                field: format!("mounts[{i}].source"),
                reason: format!("{} does not exist on the host", source.display()),
            });
        }
        let readonly = m.options().as_ref().is_some_and(|o| o.iter().any(|x| x == "ro"));
        let share_rel = format!("{id}/mounts/{i}");
        m.set_source(Some(Path::new(GUEST_SHARED_MOUNT).join(&share_rel)));
        binds.push(SharedBind {
            source,
            share_rel,
            readonly,
        });
    }
    spec.set_mounts(Some(mounts));
    // createRuntime, prestart, poststart and poststop run on the host (the shim's hooks
    // module); startContainer hooks name programs in the container and run there, in the
    // guest. createContainer hooks run in the container's namespaces but are resolved in
    // the runtime's, which in a VM is the guest's, without the host's programs: refused.
    if let Some(h) = spec.hooks().clone() {
        if h.create_container().as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(OciError::Field {
                field: "hooks.createContainer".into(),
                reason: "these run in the container's namespaces with a path from the runtime's, which inside a VM is the guest's, not the host's; not supported by vmbox (use createRuntime or startContainer)".into(),
            });
        }
        let start = h.start_container().clone().filter(|v| !v.is_empty());
        spec.set_hooks(start.map(|v| {
            let mut only = oci_spec::runtime::Hooks::default();
            only.set_start_container(Some(v));
            only
        }));
    }
    if let Some(mut linux) = spec.linux().clone() {
        linux.set_cgroups_path(None);
        linux.set_devices(None);
        if let Some(ns) = linux.namespaces_mut() {
            use oci_spec::runtime::LinuxNamespaceType as T;
            ns.retain(|n| n.typ() != T::Network);
            let app = ann.container_type == ContainerType::Container;
            for n in ns.iter_mut() {
                if let (true, Some(pod), Some(_)) = (app, pod.as_mut(), n.path()) {
                    let shared = match n.typ() {
                        T::Ipc => Some("ipc"),
                        T::Uts => Some("uts"),
                        T::Pid => Some("pid"),
                        _ => None,
                    };
                    if let Some(t) = shared {
                        pod.namespaces.push(t.to_string());
                    }
                }
                n.set_path(None);
            }
        }
        spec.set_linux(Some(linux));
    }
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(PathBuf::from("rootfs"));
    spec.set_root(Some(root));
    Ok(GuestSpec { spec, binds, pod })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> Result<Annotations, OciError> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Annotations::parse(Some(&m))
    }

    #[test]
    fn annotations_parse_and_reject_out_of_range_values_by_name() {
        let a = ann(&[
            (ANN_SANDBOX_ID, "pod1"),
            (ANN_CONTAINER_TYPE, "container"),
            (ANN_VCPUS, "2"),
        ])
        .unwrap();
        assert_eq!(a.sandbox_id.as_deref(), Some("pod1"));
        assert_eq!(a.container_type, ContainerType::Container);
        assert_eq!(a.vcpus, Some(2));
        let e = ann(&[(ANN_VCPUS, "0")]).unwrap_err().to_string();
        assert!(e.contains(ANN_VCPUS) && e.contains("\"0\""), "{e}");
        let e = ann(&[(ANN_MEMORY_MIB, "1048576")]).unwrap_err().to_string();
        assert!(e.contains(ANN_MEMORY_MIB), "{e}");
        let e = ann(&[(ANN_CONTAINER_TYPE, "pet")]).unwrap_err().to_string();
        assert!(e.contains(ANN_CONTAINER_TYPE), "{e}");
        let e = ann(&[(ANN_SANDBOX_ID, "../x")]).unwrap_err().to_string();
        assert!(e.contains(ANN_SANDBOX_ID), "{e}");
    }

    #[test]
    fn bad_config_json_names_the_file() {
        let dir = std::env::temp_dir().join(format!("vmbox-oci-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{ not json").unwrap();
        let e = load_spec(&dir).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_only_parts_are_dropped_and_binds_mapped() {
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        linux.set_cgroups_path(Some("/host/cg".into()));
        let mut ns = linux.namespaces().clone().unwrap();
        ns[0].set_path(Some("/proc/1/ns/net".into()));
        linux.set_namespaces(Some(ns));
        spec.set_linux(Some(linux));
        let mut mounts = spec.mounts().clone().unwrap();
        let bind = oci_spec::runtime::MountBuilder::default()
            .destination("/data")
            .typ("bind")
            .source("/tmp")
            .options(vec!["rbind".to_string(), "ro".to_string()])
            .build()
            .unwrap();
        mounts.push(bind);
        spec.set_mounts(Some(mounts));
        let g = to_guest(&spec, "c1", &Annotations::default()).unwrap();
        let linux = g.spec.linux().as_ref().unwrap();
        assert!(linux.cgroups_path().is_none());
        assert!(linux.namespaces().as_ref().unwrap().iter().all(|n| n.path().is_none()));
        assert_eq!(g.binds.len(), 1);
        assert!(g.binds[0].readonly);
        let data = g
            .spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/data"))
            .unwrap();
        assert_eq!(
            data.source().as_deref(),
            Some(Path::new(&format!("{GUEST_SHARED_MOUNT}/{}", g.binds[0].share_rel)))
        );
    }

    fn with_mount(m: oci_spec::runtime::Mount) -> Spec {
        let mut spec = Spec::default();
        spec.set_mounts(Some(vec![m]));
        spec
    }

    #[test]
    fn guest_filesystems_without_a_source_get_one() {
        let m = oci_spec::runtime::MountBuilder::default()
            .destination("/data")
            .typ("tmpfs")
            .options(vec!["size=1m".to_string()])
            .build()
            .unwrap();
        let g = to_guest(&with_mount(m), "c1", &Annotations::default()).unwrap();
        let m = &g.spec.mounts().as_ref().unwrap()[0];
        assert_eq!(m.source().as_deref(), Some(Path::new("tmpfs")));
        assert!(g.binds.is_empty());
    }

    #[test]
    fn host_only_filesystems_and_typeless_mounts_are_named() {
        let m = oci_spec::runtime::MountBuilder::default()
            .destination("/disk")
            .typ("ext4")
            .source("/dev/sdb1")
            .build()
            .unwrap();
        let e = to_guest(&with_mount(m), "c1", &Annotations::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mounts[0].type") && e.contains("ext4") && e.contains("/disk"),
            "{e}"
        );
        let m = oci_spec::runtime::MountBuilder::default()
            .destination("/x")
            .build()
            .unwrap();
        let e = to_guest(&with_mount(m), "c1", &Annotations::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("mounts[0].type") && e.contains("/x"), "{e}");
    }

    #[test]
    fn a_missing_bind_source_is_named() {
        let mut spec = Spec::default();
        let m = oci_spec::runtime::MountBuilder::default()
            .destination("/data")
            .typ("bind")
            .source("/nonexistent/vmbox")
            .build()
            .unwrap();
        spec.set_mounts(Some(vec![m]));
        let e = to_guest(&spec, "c1", &Annotations::default()).unwrap_err().to_string();
        assert!(
            e.contains("mounts[0].source") && e.contains("/nonexistent/vmbox"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod pod_tests {
    use super::*;
    use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType as T, MountBuilder};

    /// A spec shaped as containerd 1.6's CRI writes it: `ns` (type, host path) entries
    /// and CRI's per-sandbox /dev/shm bind.
    fn cri_spec(ns: &[(T, Option<&str>)], shm: &Path) -> Spec {
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        linux.set_namespaces(Some(
            ns.iter()
                .map(|(t, p)| {
                    let mut n = LinuxNamespaceBuilder::default().typ(*t).build().unwrap();
                    n.set_path(p.map(PathBuf::from));
                    n
                })
                .collect(),
        ));
        spec.set_linux(Some(linux));
        let shm = MountBuilder::default()
            .destination("/dev/shm")
            .typ("bind")
            .source(shm)
            .options(vec!["rbind".to_string(), "rw".to_string()])
            .build()
            .unwrap();
        spec.set_mounts(Some(vec![shm]));
        spec
    }

    fn pod_ann(sandbox: &str, typ: ContainerType) -> Annotations {
        Annotations {
            sandbox_id: Some(sandbox.into()),
            container_type: typ,
            ..Default::default()
        }
    }

    fn types(g: &GuestSpec) -> Vec<T> {
        g.spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect()
    }

    #[test]
    fn an_app_container_joins_the_pods_ipc_uts_and_shared_pid_namespaces() {
        let shm = std::env::temp_dir();
        let spec = cri_spec(
            &[
                (T::Pid, Some("/proc/77/ns/pid")),
                (T::Ipc, Some("/proc/77/ns/ipc")),
                (T::Uts, Some("/proc/77/ns/uts")),
                (T::Mount, None),
                (T::Network, Some("/proc/77/ns/net")),
            ],
            &shm,
        );
        let g = to_guest(&spec, "app", &pod_ann("pod", ContainerType::Container)).unwrap();
        let pod = g.pod.as_ref().unwrap();
        assert_eq!(pod.sandbox_id, "pod");
        assert_eq!(pod.namespaces, ["pid", "ipc", "uts"]);
        assert!(pod.shm_bytes > 0);
        assert_eq!(types(&g), [T::Pid, T::Ipc, T::Uts, T::Mount], "network dropped");
        let linux = g.spec.linux().as_ref().unwrap();
        assert!(linux.namespaces().as_ref().unwrap().iter().all(|n| n.path().is_none()));
        let m = &g.spec.mounts().as_ref().unwrap()[0];
        assert_eq!(
            m.source().as_deref(),
            Some(Path::new(&format!("{}/pod", vmbox_protocol::POD_SHM_DIR)))
        );
        assert!(g.binds.is_empty(), "the host's shm is not shared: {:?}", g.binds);
    }

    #[test]
    fn the_pod_network_follows_the_network_namespace_entry() {
        let shm = Path::new("/");
        let spec = cri_spec(&[(T::Network, Some("/var/run/netns/cni-1")), (T::Ipc, None)], shm);
        assert_eq!(pod_network(&spec), PodNetwork::Namespace("/var/run/netns/cni-1".into()));
        assert_eq!(pod_network(&cri_spec(&[(T::Network, None)], shm)), PodNetwork::Loopback);
        assert_eq!(pod_network(&cri_spec(&[(T::Ipc, None)], shm)), PodNetwork::Host);
    }

    #[test]
    fn a_container_pid_namespace_stays_its_own_and_the_sandbox_joins_nothing() {
        let shm = std::env::temp_dir();
        let own_pid = [
            (T::Pid, None),
            (T::Ipc, Some("/proc/77/ns/ipc")),
            (T::Uts, Some("/proc/77/ns/uts")),
        ];
        let g = to_guest(
            &cri_spec(&own_pid, &shm),
            "app",
            &pod_ann("pod", ContainerType::Container),
        )
        .unwrap();
        assert_eq!(g.pod.unwrap().namespaces, ["ipc", "uts"]);
        let sandbox = [
            (T::Pid, None),
            (T::Ipc, None),
            (T::Uts, None),
            (T::Network, Some("/var/run/netns/x")),
        ];
        let g = to_guest(
            &cri_spec(&sandbox, &shm),
            "pod",
            &pod_ann("pod", ContainerType::Sandbox),
        )
        .unwrap();
        assert_eq!(types(&g), [T::Pid, T::Ipc, T::Uts]);
        let pod = g.pod.unwrap();
        assert!(pod.namespaces.is_empty());
        assert!(pod.shm_bytes > 0);
    }

    #[test]
    fn a_lone_container_is_no_pod_and_keeps_its_shm_bind() {
        let g = to_guest(
            &cri_spec(&[(T::Ipc, Some("/proc/1/ns/ipc"))], &std::env::temp_dir()),
            "lone",
            &Annotations::default(),
        )
        .unwrap();
        assert!(g.pod.is_none());
        assert_eq!(g.binds.len(), 1);
        assert!(g.spec.linux().as_ref().unwrap().namespaces().as_ref().unwrap()[0]
            .path()
            .is_none());
    }
}
