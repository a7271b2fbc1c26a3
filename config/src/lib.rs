//! vmbox's configuration: one TOML file, `/etc/vmbox/config.toml` unless the environment
//! variable `VMBOX_CONFIG` names another. A missing default file means "all defaults"; a
//! file named by `VMBOX_CONFIG` must exist. Unknown keys and out-of-range values are
//! errors that name the key: a typo must never silently fall back to a default.
//!
//! `config/vmbox.toml` in the repository documents every key with its default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default location of the configuration file.
pub mod layout;
pub use layout::{SandboxPaths, MAX_RUN_DIR_LEN, MAX_STATE_DIR_LEN};

pub const DEFAULT_PATH: &str = "/etc/vmbox/config.toml";
/// Environment variable that overrides [`DEFAULT_PATH`].
pub const ENV_VAR: &str = "VMBOX_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read vmbox config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid vmbox config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid vmbox config {path}: `{key}` = {value}: {reason}")]
    Value {
        path: PathBuf,
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// KVM when the host has usable hardware virtualization, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// How host and guest reach each other over vsock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VsockBackend {
    /// The kernel's vhost-vsock when /dev/vhost-vsock exists, else vhost-user.
    Auto,
    /// A vhost-user daemon (vhost-device-vsock) with a hybrid unix socket.
    VhostUser,
    /// The kernel's vhost-vsock device (/dev/vhost-vsock) and AF_VSOCK on the host.
    Kernel,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// error, warn, info, debug or trace.
    pub log_level: String,
    /// Where sandboxes keep their sockets, logs and shared directories.
    pub state_dir: PathBuf,
    pub vm: VmConfig,
    pub binaries: Binaries,
    pub timeouts: Timeouts,
    pub confinement: Confinement,
    pub pool: Pool,
}

/// The warm pool (docs/lifecycle.md, "Warm pool"; Kata calls it VMCache): standby shims,
/// each holding a VM of the default size booted and warmed before any container asks for
/// one. `containerd-shim-vmbox-v2 start` hands a new sandbox to a ready standby when its
/// first container fits one (the default size, no network namespace path, no OCI hooks
/// before the create, the same config) and starts standbys until `size` are alive.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    /// Standby VMs kept booted, 0 to [`MAX_POOL_SIZE`]; 0 (the default) turns the pool off.
    /// Each costs an idle sandbox's memory (docs/benchmarks.md) until it is claimed.
    pub size: u32,
    /// Seconds a standby waits for a claim before it stops its VM and exits, 10 to 86400.
    pub idle_timeout_s: u64,
}

/// Upper bound of `pool.size`.
pub const MAX_POOL_SIZE: u32 = 16;

impl Default for Pool {
    fn default() -> Self {
        Pool {
            size: 0,
            idle_timeout_s: 600,
        }
    }
}

/// How the host processes a guest can reach (QEMU, vhost-device-vsock) are confined
/// (docs/security.md): each VM's run as a uid and gid of their own, taken from
/// `first_uid..first_uid + uids`, with no capabilities, `no_new_privs`, in a mount namespace
/// that holds only what they need; QEMU also under its seccomp sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Confinement {
    /// Off runs them as the shim's user (root) with every capability, as before.
    pub enabled: bool,
    /// First uid (and gid) of the range VMs take theirs from.
    pub first_uid: u32,
    /// How many uids the range holds (at most that many confined VMs at once).
    pub uids: u32,
    /// QEMU's `-sandbox` value (its seccomp filter).
    pub qemu_sandbox: String,
}

impl Default for Confinement {
    fn default() -> Self {
        Confinement {
            enabled: true,
            first_uid: DEFAULT_FIRST_UID,
            uids: 65536,
            qemu_sandbox: DEFAULT_QEMU_SANDBOX.into(),
        }
    }
}

/// Default first uid of confined VMs: above the ranges Debian hands to users' subordinate
/// ids (from 100000, 65536 each) and systemd-nspawn's container ranges (524288 to
/// 1879048191), below 2^31 (which some tools treat as signed).
pub const DEFAULT_FIRST_UID: u32 = 1_900_000_000;

/// QEMU's seccomp sandbox as vmbox asks for it: on, with obsolete system calls, privilege
/// changes, process spawning and resource control denied.
pub const DEFAULT_QEMU_SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub accelerator: Accelerator,
    pub vsock: VsockBackend,
    /// A sandbox's vCPUs when its pod asks for no CPU; the overhead added to what it asks.
    pub vcpus: u32,
    /// A sandbox's memory in MiB when its pod asks for none; the overhead (guest kernel,
    /// agent, page cache) added to what it asks.
    pub memory_mib: u32,
    /// Upper bound of a sandbox's vCPUs after sizing; 0 is the host's online CPUs.
    pub max_vcpus: u32,
    /// Upper bound of a sandbox's memory in MiB after sizing; 0 is the host's memory.
    pub max_memory_mib: u32,
    /// Under TCG: the size of QEMU's translated-code cache in MiB (`-accel tcg,tb-size=`);
    /// 0 leaves QEMU's default (up to 1 GiB). Host memory of every VM, not guest RAM.
    pub tcg_cache_mib: u32,
    /// Extra kernel command-line parameters, appended after vmbox's own.
    pub kernel_params: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Binaries {
    /// Bare names are looked up in PATH.
    pub qemu: PathBuf,
    pub virtiofsd: PathBuf,
    pub vhost_device_vsock: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// From QEMU's start to the agent's hello.
    pub boot_ms: u64,
    /// Default for one agent RPC that does not block by design.
    pub rpc_ms: u64,
    /// Creating or starting a process in the guest (container create/start, exec): these
    /// queue behind each other when many arrive at once.
    pub create_ms: u64,
    /// Between SIGTERM and SIGKILL when containers are stopped.
    pub grace_period_ms: u64,
    /// For the whole graceful shutdown of a VM, after which it is stopped hard.
    pub shutdown_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_level: "info".into(),
            state_dir: PathBuf::from("/run/vmbox"),
            vm: VmConfig::default(),
            binaries: Binaries::default(),
            timeouts: Timeouts::default(),
            confinement: Confinement::default(),
            pool: Pool::default(),
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: PathBuf::from("/usr/share/vmbox/vmlinux"),
            initramfs: PathBuf::from("/usr/share/vmbox/initramfs.img"),
            accelerator: Accelerator::Auto,
            vsock: VsockBackend::Auto,
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: 0,
            max_memory_mib: 0,
            tcg_cache_mib: DEFAULT_TCG_CACHE_MIB,
            kernel_params: String::new(),
        }
    }
}

impl Default for Binaries {
    fn default() -> Self {
        Binaries {
            qemu: PathBuf::from("qemu-system-x86_64"),
            virtiofsd: PathBuf::from("virtiofsd"),
            vhost_device_vsock: PathBuf::from("vhost-device-vsock"),
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            boot_ms: 30_000,
            rpc_ms: 10_000,
            create_ms: 60_000,
            grace_period_ms: 5_000,
            shutdown_ms: 15_000,
        }
    }
}

/// Bounds that config values and annotation overrides must stay within.
pub const MAX_VCPUS: u32 = 64;
pub const MIN_MEMORY_MIB: u32 = 64;
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// Bounds of `vm.tcg_cache_mib` when set.
pub const MIN_TCG_CACHE_MIB: u32 = 4;
pub const MAX_TCG_CACHE_MIB: u32 = 4096;
/// QEMU's own default is up to 1 GiB per VM, filled as guest code is translated, and
/// under TCG a guest that keeps starting processes fills it (each exec is new code at new,
/// randomised addresses). 32 MiB kept exec latency at the uncapped figure; 16 doubled it.
pub const DEFAULT_TCG_CACHE_MIB: u32 = 32;

impl Config {
    /// Loads the file `VMBOX_CONFIG` names, else [`DEFAULT_PATH`] if it exists, else defaults.
    pub fn load() -> Result<Config, ConfigError> {
        match std::env::var_os(ENV_VAR) {
            Some(p) => Config::from_file(Path::new(&p)),
            None if Path::new(DEFAULT_PATH).exists() => Config::from_file(Path::new(DEFAULT_PATH)),
            None => Ok(Config::default()),
        }
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and validates; `path` only names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, value: String, reason: String| ConfigError::Value {
            path: path.to_path_buf(),
            key,
            value,
            reason,
        };
        if !matches!(self.log_level.as_str(), "error" | "warn" | "info" | "debug" | "trace") {
            return Err(bad(
                "log_level",
                format!("{:?}", self.log_level),
                "expected error, warn, info, debug or trace".into(),
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vm.vcpus) {
            return Err(bad(
                "vm.vcpus",
                self.vm.vcpus.to_string(),
                format!("expected 1 to {MAX_VCPUS}"),
            ));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.vm.memory_mib) {
            return Err(bad(
                "vm.memory_mib",
                self.vm.memory_mib.to_string(),
                format!("expected {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}"),
            ));
        }
        if self.vm.max_vcpus != 0 && !(self.vm.vcpus..=MAX_VCPUS).contains(&self.vm.max_vcpus) {
            return Err(bad(
                "vm.max_vcpus",
                self.vm.max_vcpus.to_string(),
                format!(
                    "expected 0 (the host's CPUs) or vm.vcpus ({}) to {MAX_VCPUS}",
                    self.vm.vcpus
                ),
            ));
        }
        if self.vm.max_memory_mib != 0 && !(self.vm.memory_mib..=MAX_MEMORY_MIB).contains(&self.vm.max_memory_mib) {
            return Err(bad(
                "vm.max_memory_mib",
                self.vm.max_memory_mib.to_string(),
                format!(
                    "expected 0 (no bound) or vm.memory_mib ({}) to {MAX_MEMORY_MIB}",
                    self.vm.memory_mib
                ),
            ));
        }
        if self.vm.tcg_cache_mib != 0 && !(MIN_TCG_CACHE_MIB..=MAX_TCG_CACHE_MIB).contains(&self.vm.tcg_cache_mib) {
            return Err(bad(
                "vm.tcg_cache_mib",
                self.vm.tcg_cache_mib.to_string(),
                format!("expected 0 (QEMU's default) or {MIN_TCG_CACHE_MIB} to {MAX_TCG_CACHE_MIB}"),
            ));
        }
        for (key, v) in [
            ("timeouts.boot_ms", self.timeouts.boot_ms),
            ("timeouts.rpc_ms", self.timeouts.rpc_ms),
            ("timeouts.create_ms", self.timeouts.create_ms),
            ("timeouts.shutdown_ms", self.timeouts.shutdown_ms),
        ] {
            if !(100..=3_600_000).contains(&v) {
                return Err(bad(key, v.to_string(), "expected 100 to 3600000 (milliseconds)".into()));
            }
        }
        if self.timeouts.grace_period_ms > 3_600_000 {
            return Err(bad(
                "timeouts.grace_period_ms",
                self.timeouts.grace_period_ms.to_string(),
                "expected at most 3600000 (milliseconds)".into(),
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(bad(
                "state_dir",
                self.state_dir.display().to_string(),
                "must be an absolute path".into(),
            ));
        }
        if self.pool.size > MAX_POOL_SIZE {
            return Err(bad(
                "pool.size",
                self.pool.size.to_string(),
                format!("expected 0 (no pool) to {MAX_POOL_SIZE}"),
            ));
        }
        if !(10..=86_400).contains(&self.pool.idle_timeout_s) {
            return Err(bad(
                "pool.idle_timeout_s",
                self.pool.idle_timeout_s.to_string(),
                "expected 10 to 86400 (seconds)".into(),
            ));
        }
        let c = &self.confinement;
        if c.first_uid == 0 || c.uids == 0 || c.first_uid.checked_add(c.uids).is_none_or(|end| end > u32::MAX - 1) {
            return Err(bad(
                "confinement.first_uid",
                format!("{} (uids {})", c.first_uid, c.uids),
                "expected a range of at least one uid above 0 that ends below 4294967295".into(),
            ));
        }
        if !c.qemu_sandbox.starts_with("on")
            || !c
                .qemu_sandbox
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b',' || b == b'=')
        {
            return Err(bad(
                "confinement.qemu_sandbox",
                format!("{:?}", c.qemu_sandbox),
                "expected QEMU's -sandbox value, starting with on (letters, = and , only)".into(),
            ));
        }
        if self.vm.kernel_params.contains("vmbox.") {
            return Err(bad(
                "vm.kernel_params",
                format!("{:?}", self.vm.kernel_params),
                "vmbox.* parameters are set by vmbox itself".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml(s, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn documented_example_parses_to_the_defaults() {
        let text = include_str!("../vmbox.toml");
        assert_eq!(parse(text).unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[vm]\nmemry_mib = 512\n").unwrap_err().to_string();
        assert!(err.contains("memry_mib"), "{err}");
        let err = parse("bogus = 1\n").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = parse("[vm]\nvcpus = 0\n").unwrap_err().to_string();
        assert!(err.contains("vm.vcpus"), "{err}");
        let err = parse("[vm]\nmemory_mib = 1048576\n").unwrap_err().to_string();
        assert!(err.contains("vm.memory_mib"), "{err}");
        let err = parse("[vm]\nvcpus = 2\nmax_vcpus = 1\n").unwrap_err().to_string();
        assert!(err.contains("vm.max_vcpus"), "{err}");
        let err = parse("[vm]\nmax_memory_mib = 100\n").unwrap_err().to_string();
        assert!(err.contains("vm.max_memory_mib"), "{err}");
        let err = parse("[vm]\ntcg_cache_mib = 2\n").unwrap_err().to_string();
        assert!(err.contains("vm.tcg_cache_mib"), "{err}");
        assert_eq!(parse("[vm]\ntcg_cache_mib = 0\n").unwrap().vm.tcg_cache_mib, 0);
        let err = parse("[vm]\naccelerator = \"hvf\"\n").unwrap_err().to_string();
        assert!(err.contains("accelerator") && err.contains("hvf"), "{err}");
        let err = parse("log_level = \"loud\"\n").unwrap_err().to_string();
        assert!(err.contains("log_level"), "{err}");
        let err = parse("[timeouts]\nboot_ms = 1\n").unwrap_err().to_string();
        assert!(err.contains("timeouts.boot_ms"), "{err}");
        let err = parse("[confinement]\nfirst_uid = 4294967000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("confinement.first_uid"), "{err}");
        let err = parse("[confinement]\nqemu_sandbox = \"off\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("confinement.qemu_sandbox"), "{err}");
        assert!(!parse("[confinement]\nenabled = false\n").unwrap().confinement.enabled);
        let err = parse("[pool]\nsize = 17\n").unwrap_err().to_string();
        assert!(err.contains("pool.size"), "{err}");
        let err = parse("[pool]\nidle_timeout_s = 1\n").unwrap_err().to_string();
        assert!(err.contains("pool.idle_timeout_s"), "{err}");
        assert_eq!(parse("[pool]\nsize = 2\n").unwrap().pool.size, 2);
    }

    #[test]
    fn overrides_apply() {
        let c = parse("[vm]\naccelerator = \"tcg\"\nvcpus = 2\nvsock = \"vhost-user\"\n").unwrap();
        assert_eq!(c.vm.accelerator, Accelerator::Tcg);
        assert_eq!(c.vm.vcpus, 2);
        assert_eq!(c.vm.vsock, VsockBackend::VhostUser);
    }

    #[test]
    fn missing_file_named_by_env_is_an_error_naming_it() {
        let err = Config::from_file(Path::new("/nonexistent/vmbox.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/vmbox.toml"), "{err}");
    }
}
