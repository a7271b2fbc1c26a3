//! The shim process's lifecycle: `start` (find or spawn the sandbox's shim), `delete`
//! (clean up after a shim that died), and serving the task service.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::{Config as ShimConfig, Error, Flags, StartOpts};
use vmbox_config::Config;
use vmbox_oci::Annotations;

use vmbox_hypervisor::qemu::Qemu;
use vmbox_hypervisor::Hypervisor;
use vmbox_protocol::Id;

use crate::core::process::now;
use crate::core::sandbox::live_owner;
use crate::core::seams::{layout, Seams};
use crate::core::Core;
use crate::events::Forwarder;
use crate::task::TaskService;

pub struct Service {
    id: String,
    namespace: String,
    config: Result<Config, String>,
    exit: Arc<ExitSignal>,
}

/// The sandbox a bundle's container belongs to (its own id when it is alone).
fn sandbox_of(bundle: &Path, id: &str) -> String {
    vmbox_oci::load_spec(bundle)
        .ok()
        .and_then(|s| Annotations::parse(s.annotations().as_ref()).ok())
        .and_then(|a| a.sandbox_id)
        .unwrap_or_else(|| id.to_string())
}

/// Milliseconds since this process started (from /proc/self/stat and the boot clock).
fn process_age_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let start_ticks: u64 = stat.rsplit(')').next()?.split_whitespace().nth(19)?.parse().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(((uptime - start_ticks as f64 / hz as f64) * 1000.0).max(0.0) as u64)
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut ShimConfig) -> Self {
        // Set by main before the crate reads them (see there); kept for the record: the
        // host side's reaping is per child, and orphans go to init, not to this shim.
        config.no_reaper = true;
        config.no_sub_reaper = true;
        let cfg = Config::load().map_err(|e| e.to_string());
        if let Ok(c) = &cfg {
            config.default_log_level = c.log_level.clone();
        }
        Service {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            config: cfg,
            exit: Arc::default(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(format!("cwd: {e}")))?;
        let grouping = sandbox_of(&bundle, &opts.id);
        let address = match self.config.as_ref().ok().filter(|c| c.pool.size > 0) {
            Some(config) => crate::pool::start(config.clone(), opts, &grouping, &bundle).await?,
            None => spawn(opts, &grouping, Vec::new()).await?,
        };
        std::fs::write(bundle.join("address"), &address).map_err(|e| Error::Other(format!("write address: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // containerd runs this when the shim is gone: stop what it left.
        let bundle = std::env::current_dir().map_err(|e| Error::Other(format!("cwd: {e}")))?;
        let sandbox = sandbox_of(&bundle, &self.id);
        // A Create with a ConfigPath recorded it in the bundle: that config's state_dir.
        let recorded = std::fs::read(bundle.join(crate::options::BUNDLE_CONFIG_PATH))
            .ok()
            .map(|p| std::path::PathBuf::from(String::from_utf8_lossy(&p).into_owned()))
            .filter(|p| p.is_absolute())
            .and_then(|p| match Config::from_file(&p) {
                Ok(c) => Some(Ok(c)),
                Err(e) => {
                    log::warn!("delete: the recorded config does not load ({e}); using the default");
                    None
                }
            });
        let config = recorded.unwrap_or_else(|| self.config.clone());
        if let Err(e) = &config {
            log::warn!(
                "delete: no usable config ({e}): what sandbox {} left is not cleaned up",
                self.id
            );
        }
        let layout = match (&config, Id::parse("id", &sandbox)) {
            (Ok(config), Ok(id)) => layout(&config.state_dir, &self.namespace, &id)
                .ok()
                .map(|l| (l, config)),
            _ => None,
        };
        if let Some((mut layout, config)) = layout {
            // A sandbox of a shim from before the layout of vmbox-config (0.1):
            // `<state_dir>/<namespace>-<id>/`, its VM in `vm/` below it.
            let legacy = config.state_dir.join(format!("{}-{sandbox}", self.namespace));
            if !layout.dir.exists() && legacy.join("shim.pid").exists() {
                layout.run_dir = legacy.join("vm");
                layout.dir = legacy;
            }
            if let Some(pid) = live_owner(&layout.dir) {
                // A Create that failed inside a running pod ends here too: the pod's shim
                // still owns the sandbox, and it has already cleaned up the container.
                log::info!("sandbox {sandbox} is served by live shim {pid}: nothing to clean up");
            } else if layout.dir.exists() {
                // The sandbox directory is made before the VM's: without it there is no VM
                // of this sandbox to stop (and a run directory alone may be a live one's).
                log::warn!("cleaning up after a dead shim: {}", layout.dir.display());
                let hypervisor = Qemu;
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = hypervisor.cleanup(&layout.run_dir) {
                        log::warn!("{e}");
                    }
                    crate::mounts::unmount_and_remove(&layout.dir);
                })
                .await
                .ok();
            }
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 137,
            exited_at: Some(now()).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // From here the process ends within EXIT_DEADLINE even if the crate's server
        // shutdown or a task waits on a peer that never answers.
        crate::exit_within_deadline(self.id.clone());
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        if let Some(ms) = process_age_ms() {
            log::debug!("timing: shim={} shim_start_ms={ms}", self.id);
        }
        let seams = Seams::system(Arc::new(Forwarder::start(publisher, self.namespace.clone())));
        let core = Core::new(self.config.clone(), &self.namespace, seams);
        crate::signals::graceful_on_sigterm(core.clone(), self.exit.clone());
        TaskService::new(core, self.exit.clone())
    }
}
