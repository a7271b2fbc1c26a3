//! OCI hooks that run on the host, as runc runs them: `createRuntime` and the legacy
//! `prestart` before the container is created, `poststart` after it started, `poststop`
//! after it was deleted. Each runs in the shim's namespaces with the container's OCI state
//! (JSON) on its stdin, its `args` (argv, `args[0]` included) and only its `env`, and is
//! killed at its `timeout` (seconds; [`DEFAULT_TIMEOUT`] when unset, so a stuck hook
//! cannot hold the shim for ever). A failing `createRuntime`/`prestart` hook fails the
//! create; `poststart`/`poststop` failures are logged (runtime-spec: "the runtime MUST log
//! a warning"). The hooks of the container's world (`createContainer`, `startContainer`)
//! are [`vmbox_oci::to_guest`]'s business.
//!
//! nerdctl's networking runs from `createRuntime`: it reads the state's `pid` and puts the
//! CNI's interfaces into `/proc/<pid>/ns/net`. The sandbox's boot therefore runs these
//! hooks first, with the pid of a [`NetnsHolder`] thread in the network namespace the VM
//! will use, and scans that namespace only afterwards.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use oci_spec::runtime::{Hook, Spec};

use crate::error::ShimError;

/// The timeout of a hook that sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Output of a failed hook kept for the error message.
const OUTPUT_LIMIT: usize = 4096;

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Before the container is created, after the runtime's environment is.
    CreateRuntime,
    /// Legacy: as createRuntime, after it.
    Prestart,
    /// After the container's process started.
    Poststart,
    /// After the container was deleted.
    Poststop,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::CreateRuntime => "createRuntime",
            Stage::Prestart => "prestart",
            Stage::Poststart => "poststart",
            Stage::Poststop => "poststop",
        }
    }
}

/// A container's host hooks and what their OCI state is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostHooks {
    /// The container's id (the state's `id`).
    pub id: String,
    /// Its bundle directory (the state's `bundle`).
    pub bundle: PathBuf,
    /// The spec's `ociVersion`.
    pub oci_version: String,
    /// The spec's annotations (the state's).
    pub annotations: std::collections::HashMap<String, String>,
    /// `hooks.createRuntime`.
    pub create_runtime: Vec<Hook>,
    /// `hooks.prestart`.
    pub prestart: Vec<Hook>,
    /// `hooks.poststart`.
    pub poststart: Vec<Hook>,
    /// `hooks.poststop`.
    pub poststop: Vec<Hook>,
}

impl HostHooks {
    /// The host hooks of container `id`'s spec.
    pub fn of(spec: &Spec, id: &str, bundle: &Path) -> HostHooks {
        let h = spec.hooks().clone().unwrap_or_default();
        #[allow(deprecated)]
        let prestart = h.prestart().clone().unwrap_or_default();
        HostHooks {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            oci_version: spec.version().clone(),
            annotations: spec.annotations().clone().unwrap_or_default(),
            create_runtime: h.create_runtime().clone().unwrap_or_default(),
            prestart,
            poststart: h.poststart().clone().unwrap_or_default(),
            poststop: h.poststop().clone().unwrap_or_default(),
        }
    }

    /// Whether any hook runs before the container is created.
    pub fn before_create(&self) -> bool {
        !self.create_runtime.is_empty() || !self.prestart.is_empty()
    }

    fn state(&self, status: &str, pid: u32) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "ociVersion": self.oci_version,
            "id": self.id,
            "status": status,
            "pid": pid,
            "bundle": self.bundle,
            "annotations": self.annotations,
        }))
        .unwrap_or_default()
    }

    /// Runs `createRuntime`, then `prestart` (state "creating", `pid`). Blocking. The
    /// first failure stops the rest and is returned (InvalidArgument when the hook's
    /// program cannot be started, Internal when it fails).
    pub fn run_before_create(&self, pid: u32) -> Result<(), ShimError> {
        let state = self.state("creating", pid);
        for (stage, hooks) in [
            (Stage::CreateRuntime, &self.create_runtime),
            (Stage::Prestart, &self.prestart),
        ] {
            for (i, h) in hooks.iter().enumerate() {
                run(h, &state).map_err(|e| e.named(stage, i))?;
            }
        }
        Ok(())
    }

    /// Runs `poststart` (state "running") or `poststop` (state "stopped"); failures are
    /// logged. Blocking.
    pub fn run_after(&self, stage: Stage, pid: u32) {
        let (hooks, status) = match stage {
            Stage::Poststart => (&self.poststart, "running"),
            Stage::Poststop => (&self.poststop, "stopped"),
            _ => return,
        };
        let state = self.state(status, pid);
        for (i, h) in hooks.iter().enumerate() {
            if let Err(e) = run(h, &state) {
                log::warn!("container {}: {}", self.id, e.named(stage, i));
            }
        }
    }
}

/// Why a hook failed.
#[derive(Debug)]
enum HookError {
    Spawn(PathBuf, std::io::Error),
    Failed(PathBuf, String, String),
    Timeout(PathBuf, Duration),
}

impl HookError {
    fn named(self, stage: Stage, i: usize) -> ShimError {
        let field = format!("hooks.{}[{i}]", stage.name());
        match self {
            HookError::Spawn(p, e) => ShimError::Invalid(format!("{field}: cannot run {}: {e}", p.display())),
            HookError::Failed(p, status, out) => {
                ShimError::Internal(format!("{field}: {} failed ({status}): {}", p.display(), out.trim()))
            }
            HookError::Timeout(p, t) => ShimError::Internal(format!(
                "{field}: {} did not finish within its timeout of {} s; killed",
                p.display(),
                t.as_secs()
            )),
        }
    }
}

/// Drains `r` on a thread of its own, keeping the first [`OUTPUT_LIMIT`] bytes.
fn drain(r: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut r) = r {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let room = OUTPUT_LIMIT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            let _ = tx.send(kept);
        });
    }
    rx
}

/// Runs one hook with `state` on its stdin, bounded by its timeout. The hook is the
/// leader of a process group of its own: at the timeout the whole group is killed.
fn run(h: &Hook, state: &[u8]) -> Result<(), HookError> {
    let path = h.path().clone();
    let mut cmd = Command::new(&path);
    let args = h.args().clone().unwrap_or_default();
    if let Some((argv0, rest)) = args.split_first() {
        cmd.arg0(argv0).args(rest);
    }
    cmd.env_clear();
    for kv in h.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.process_group(0);
    let timeout = h
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t as u64))
        .unwrap_or(DEFAULT_TIMEOUT);
    let mut child = cmd.spawn().map_err(|e| HookError::Spawn(path.clone(), e))?;
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    // A hook that does not read its stdin must not block us: write from a thread.
    if let Some(mut stdin) = child.stdin.take() {
        let state = state.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&state);
        });
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(s) => s,
        Err(_) => {
            // The leader is not reaped yet (its waiter still blocks in wait), so the
            // group id is still the hook's.
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            return Err(HookError::Timeout(path, timeout));
        }
    };
    match status {
        Ok(s) if s.success() => {
            log::debug!("hook {} done", path.display());
            Ok(())
        }
        status => {
            // What it printed; a daemon it left holding the pipes gets a second.
            let mut text = Vec::new();
            for rx in [out, err] {
                text.extend(rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default());
            }
            let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            Err(HookError::Failed(
                path,
                status,
                String::from_utf8_lossy(&text).into_owned(),
            ))
        }
    }
}

/// A thread inside a network namespace (the pod's, or a new one), standing in for the
/// container's init while `createRuntime`/`prestart` hooks run: the hooks get its thread
/// id as the state's `pid`, and `/proc/<tid>/ns/net` names the namespace. It leaves when
/// dropped; a new namespace then lives on only through the VMM started in it.
pub struct NetnsHolder {
    tid: u32,
    release: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NetnsHolder {
    /// Enters `path`, or a new network namespace (with `lo` up, as runc gives) when `None`.
    pub fn new(path: Option<&Path>) -> Result<NetnsHolder, ShimError> {
        let ns = match path {
            Some(p) => Some(
                std::fs::File::open(p)
                    .map_err(|e| ShimError::Invalid(format!("network namespace {}: {e}", p.display())))?,
            ),
            None => None,
        };
        let (ready_tx, ready_rx) = mpsc::channel::<Result<u32, String>>();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("netns-holder".into())
            .spawn(move || {
                use nix::sched::CloneFlags;
                let entered = match &ns {
                    Some(f) => nix::sched::setns(f, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}")),
                    None => nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("unshare: {e}"))
                        .and_then(|()| {
                            vmbox_network::netns::run_in(Some(Path::new("/proc/thread-self/ns/net")), |h| async move {
                                vmbox_network::guest::apply(&h, &Default::default()).await
                            })
                            .map(|_| ())
                            .map_err(|e| format!("bring lo up: {e}"))
                        }),
                };
                let _ = ready_tx.send(entered.map(|()| nix::unistd::gettid().as_raw() as u32));
                let _ = release_rx.recv();
            })
            .map_err(|e| ShimError::Internal(format!("start the network namespace holder: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(tid)) => Ok(NetnsHolder {
                tid,
                release: Some(release_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(ShimError::Internal(format!("network namespace for the hooks: {e}"))),
            Err(_) => Err(ShimError::Internal("the network namespace holder died".into())),
        }
    }

    /// The holder's thread id: the OCI state's `pid` for the hooks.
    pub fn pid(&self) -> u32 {
        self.tid
    }

    /// The namespace, while the holder lives.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/task/{}/ns/net", std::process::id(), self.tid))
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(script: &str, timeout: Option<i64>) -> Hook {
        let mut h = Hook::default();
        h.set_path("/bin/sh".into());
        h.set_args(Some(vec!["sh".into(), "-c".into(), script.into()]));
        h.set_env(Some(vec!["GREETING=hi".into()]));
        h.set_timeout(timeout);
        h
    }

    fn hooks(stage: Stage, h: Hook) -> HostHooks {
        let mut hh = HostHooks {
            id: "c1".into(),
            bundle: "/b".into(),
            oci_version: "1.0.2".into(),
            ..Default::default()
        };
        match stage {
            Stage::CreateRuntime => hh.create_runtime = vec![h],
            Stage::Prestart => hh.prestart = vec![h],
            Stage::Poststart => hh.poststart = vec![h],
            Stage::Poststop => hh.poststop = vec![h],
        }
        hh
    }

    #[test]
    fn a_hook_gets_the_state_its_args_and_only_its_env() {
        let dir = std::env::temp_dir().join(format!("vmbox-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("state");
        let script = format!(
            "cat > {}; echo \"$0 $GREETING ${{HOME:-nohome}}\" >> {}",
            out.display(),
            out.display()
        );
        hooks(Stage::CreateRuntime, hook(&script, None))
            .run_before_create(42)
            .unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        assert!(
            got.starts_with(
                r#"{"annotations":{},"bundle":"/b","id":"c1","ociVersion":"1.0.2","pid":42,"status":"creating"}"#
            ),
            "{got}"
        );
        assert!(got.ends_with("sh hi nohome\n"), "{got}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failing_or_stuck_hook_fails_the_create_naming_it() {
        let e = hooks(Stage::Prestart, hook("echo broken >&2; exit 3", None))
            .run_before_create(1)
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("hooks.prestart[0]") && msg.contains("broken") && msg.contains("3"),
            "{msg}"
        );
        let t = std::time::Instant::now();
        let e = hooks(Stage::CreateRuntime, hook("sleep 30", Some(1)))
            .run_before_create(1)
            .unwrap_err();
        assert!(e.to_string().contains("timeout of 1 s"), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the stuck hook was not killed at its timeout"
        );
        let e = hooks(Stage::CreateRuntime, {
            let mut h = hook("", None);
            h.set_path("/nonexistent/hook".into());
            h
        })
        .run_before_create(1)
        .unwrap_err();
        assert!(
            matches!(e, ShimError::Invalid(_)) && e.to_string().contains("/nonexistent/hook"),
            "{e}"
        );
    }
}
