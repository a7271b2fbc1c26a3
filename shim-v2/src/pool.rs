//! The warm pool (docs/lifecycle.md, "Warm pool"; Kata's VMCache): standby shims, each a
//! `containerd-shim-vmbox-v2 standby <sid>` process holding a VM of the default size,
//! booted and warmed up before any container asks for one.
//!
//! - `start` ([`claim`]) hands a new sandbox to a ready standby: the standby binds the
//!   socket containerd will dial, serves the Task API from then on like any shim, and
//!   its first boot takes the VM over when the sandbox fits it ([`Standby::misfit`]).
//!   With no standby ready, `start` spawns a shim as without a pool.
//! - `start` also [`refill`]s: it starts standbys until `pool.size` are alive, and cleans
//!   up after standbys that died.
//! - A standby not claimed within `pool.idle_timeout_s`, or sent SIGTERM, stops its VM and
//!   exits; `containerd-shim-vmbox-v2 pool drain` stops them all ([`drain`]).
//!
//! Files, in `<state_dir>/pool/`: `<sid>.pid` (a live standby, written by its spawner under
//! `refill.lock`), `<sid>.sock` (it is ready for a claim), `<sid>.claimed` (the `.pid`
//! renamed once a claim is accepted), `<sid>.log` (its log until it is claimed),
//! `last-failure.log`. Its sandbox directories are those of sandbox `<sid>` in namespace
//! [`NAMESPACE`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::logger::FifoLogger;
use containerd_shim::protos::ttrpc::r#async::transport::Listener;
use containerd_shim::protos::ttrpc::r#async::Server;
use serde::{Deserialize, Serialize};
use vmbox_config::Config;
use vmbox_hypervisor::qemu::Qemu;
use vmbox_hypervisor::Hypervisor;
use vmbox_protocol::Id;

use crate::core::sandbox::{Sandbox, Shape, Standby};
use crate::core::seams::{layout, Seams};
use crate::core::Core;
use crate::events::{Event, EventSink, Forwarder};
use crate::task::TaskService;

/// The containerd namespace standbys' sandbox directories are under. containerd's
/// namespaces never begin with `_`, so it is never a real one.
pub const NAMESPACE: &str = "_pool";
/// How long `start` waits for standbys to take its claim, all of them together. Longer
/// than [`BECOME_LIMIT`] plus [`CLAIM_TIMEOUT`]: a standby that answers at all answers
/// before its claimer gives up.
const CLAIM_DEADLINE: Duration = Duration::from_secs(15);
/// How long a standby waits for a claim's bytes, and for its answer to be taken.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a standby may take to become the claiming sandbox's shim (log, events, the
/// Task API served on containerd's socket).
const BECOME_LIMIT: Duration = Duration::from_secs(5);
/// After a standby failed to boot, no new one is started for this long.
const FAILURE_BACKOFF: Duration = Duration::from_secs(60);
/// Upper bound of a claim message and of an answer, in bytes.
const MAX_MESSAGE: u64 = 64 * 1024;
/// Upper bound of a standby's warm-up container run.
const WARM_UP_LIMIT: Duration = Duration::from_secs(60);

/// What `start` tells the standby it claims: who it is from now on (containerd's shim
/// flags) and where containerd will dial it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claim {
    namespace: String,
    /// The task id `start` was run for.
    id: String,
    /// containerd's main socket (`-address`).
    address: String,
    /// containerd's ttrpc socket, for events.
    ttrpc_address: String,
    /// The socket to serve the Task API on (`unix://...`, from `socket_address`).
    socket: String,
    debug: bool,
    /// The bundle `start` was run in: the standby's working directory from then on (the
    /// `log` FIFO, the `address` file).
    bundle: PathBuf,
}

impl Claim {
    /// The claim for the sandbox `start` runs for, to be served on `socket`.
    pub fn new(opts: &containerd_shim::StartOpts, socket: &str, bundle: &Path) -> Claim {
        Claim {
            namespace: opts.namespace.clone(),
            id: opts.id.clone(),
            address: opts.address.clone(),
            ttrpc_address: opts.ttrpc_address.clone(),
            socket: socket.to_string(),
            debug: opts.debug,
            bundle: bundle.to_path_buf(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    /// `None`: the standby serves the socket.
    error: Option<String>,
}

/// `<state_dir>/pool`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pool")
}

/// Whether `pid` is the live standby `sid` (its command line names both).
fn is_standby(pid: u32, sid: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.len() >= 3
                && args[0].ends_with(b"containerd-shim-vmbox-v2")
                && args[1] == b"standby"
                && args[2] == sid.as_bytes()
        })
        .unwrap_or(false)
}

/// `start` with a pool: a new sandbox that fits a standby goes to a ready one; any other
/// (or with none ready) gets a shim spawned as without a pool, and so does a sandbox whose
/// shim is already up (the spawned process finds it and gives its address). Then the pool
/// is refilled. Returns the address containerd dials.
pub async fn start(
    config: Config,
    opts: containerd_shim::StartOpts,
    grouping: &str,
    bundle: &Path,
) -> Result<String, containerd_shim::Error> {
    let address = containerd_shim::socket_address(&opts.address, &opts.namespace, grouping);
    let live = tokio::net::UnixStream::connect(socket_path(&address)).await.is_ok();
    let misfit = (!live).then(|| misfit(&config, bundle, &opts.id)).flatten();
    if let Some(why) = &misfit {
        log::debug!("sandbox of {}: no standby VM: {why}", opts.id);
    }
    let fits = !live && misfit.is_none();
    let claimed = fits && {
        let (c, msg) = (config.clone(), Claim::new(&opts, &address, bundle));
        tokio::task::spawn_blocking(move || claim(&c, &msg))
            .await
            .unwrap_or(false)
    };
    let address = if claimed {
        address
    } else {
        containerd_shim::asynchronous::spawn(opts, grouping, Vec::new()).await?
    };
    // Before `start` answers: a refill never waits for the pool's lock, and a standby is
    // a detached process whose boot `start` does not wait for.
    let _ = tokio::task::spawn_blocking(move || refill(&config)).await;
    Ok(address)
}

/// Hands the sandbox `start` was run for to a ready standby. Blocking. Returns whether
/// one took it; a standby that fails or does not answer in time is skipped (the next is
/// tried, then the caller spawns a shim as without a pool).
pub fn claim(config: &Config, msg: &Claim) -> bool {
    let pool = dir(&config.state_dir);
    let mut ready: Vec<(std::time::SystemTime, PathBuf)> = match std::fs::read_dir(&pool) {
        Ok(d) => d
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .map(|p| {
                (
                    p.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH),
                    p,
                )
            })
            .collect(),
        Err(_) => return false,
    };
    // The longest-ready first: its warm-up is surely over.
    ready.sort();
    let deadline = std::time::Instant::now() + CLAIM_DEADLINE;
    for (_, sock) in ready {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        match claim_one(&sock, msg, left) {
            Ok(()) => {
                log::info!("sandbox of {} handed to standby {}", msg.id, sock.display());
                return true;
            }
            Err(e) => log::debug!("standby {}: {e}", sock.display()),
        }
    }
    false
}

fn claim_one(sock: &Path, msg: &Claim, left: Duration) -> std::io::Result<()> {
    // A unix socket's connect does not wait: it is taken or refused at once.
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(left))?;
    s.set_write_timeout(Some(left))?;
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s.take(MAX_MESSAGE)).read_line(&mut answer)?;
    let a: Answer = serde_json::from_str(&answer)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("answer: {e}")))?;
    match a.error {
        None => Ok(()),
        Some(e) => Err(std::io::Error::other(e)),
    }
}

/// Holds `<pool>/refill.lock` (flock) while it lives: one refill or drain at a time.
struct PoolLock {
    _file: std::fs::File,
}

impl PoolLock {
    /// Takes the lock; without `wait`, fails with `WouldBlock` when it is held.
    fn take(pool: &Path, wait: bool) -> std::io::Result<PoolLock> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(pool)?;
        // Only root reaches the standbys' sockets: a claim names files the standby opens.
        std::fs::set_permissions(pool, std::fs::Permissions::from_mode(0o700))?;
        let f = std::fs::File::create(pool.join("refill.lock"))?;
        // SAFETY: flock on an fd this function owns.
        let how = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        if unsafe { libc::flock(f.as_raw_fd(), how) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(PoolLock { _file: f })
    }
}

/// A standby as its files in the pool directory record it.
struct Recorded {
    sid: String,
    pid: u32,
    /// `<sid>.claimed` rather than `<sid>.pid`: it serves a sandbox now. Until the
    /// sandbox's first boot links its directories to the standby's, this file is the only
    /// record of the VM; a claimed standby that died is cleaned up like a standby.
    claimed: bool,
    alive: bool,
}

/// The standbys (and claimed standbys) recorded in `pool`.
fn recorded(pool: &Path) -> Vec<Recorded> {
    let Ok(d) = std::fs::read_dir(pool) else {
        return Vec::new();
    };
    d.flatten()
        .filter_map(|e| {
            let p = e.path();
            let claimed = match p.extension()?.to_str()? {
                "pid" => false,
                "claimed" => true,
                _ => return None,
            };
            let sid = p.file_stem()?.to_str()?.to_string();
            let pid: u32 = std::fs::read_to_string(&p).ok()?.trim().parse().ok()?;
            let alive = is_standby(pid, &sid);
            Some(Recorded {
                sid,
                pid,
                claimed,
                alive,
            })
        })
        .collect()
}

/// Removes what standby `sid` left: its VM (processes, run directory), its sandbox
/// directory and its files in the pool directory. Blocking.
fn clean_up(config: &Config, sid: &str) {
    let pool = dir(&config.state_dir);
    if let Ok(id) = Id::parse("standby id", sid) {
        if let Ok(l) = layout(&config.state_dir, NAMESPACE, &id) {
            if let Err(e) = Qemu.cleanup(&l.run_dir) {
                log::warn!("standby {sid}: {e}");
            }
            crate::mounts::unmount_and_remove(&l.dir);
        }
    }
    for ext in ["sock", "log", "pid", "claimed"] {
        let _ = std::fs::remove_file(pool.join(format!("{sid}.{ext}")));
    }
}

/// Starts standbys until `pool.size` are alive, after cleaning up after dead ones.
/// Blocking; the standbys boot in the background, detached from the caller.
///
/// It never waits: while another refill or a drain holds the pool's lock, it does
/// nothing (that one counts for both); for [`FAILURE_BACKOFF`] after a standby failed to
/// boot (`last-failure.log`), it starts none.
pub fn refill(config: &Config) {
    let pool = dir(&config.state_dir);
    let _lock = match PoolLock::take(&pool, false) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
        Err(e) => return log::warn!("pool: lock {}: {e}", pool.display()),
    };
    let mut alive = 0;
    for r in recorded(&pool) {
        if !r.alive {
            log::info!("pool: standby {} is gone; cleaning up after it", r.sid);
            clean_up(config, &r.sid);
        } else if !r.claimed {
            alive += 1;
        }
    }
    let failed_lately = std::fs::metadata(pool.join("last-failure.log"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < FAILURE_BACKOFF);
    if failed_lately {
        return;
    }
    for _ in alive..config.pool.size {
        if let Err(e) = spawn_standby(&pool) {
            log::warn!("pool: start a standby: {e}");
            break;
        }
    }
}

fn spawn_standby(pool: &Path) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let sid = format!("s{nanos:x}");
    let log = std::fs::File::create(pool.join(format!("{sid}.log")))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["standby", &sid])
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid only, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // Recorded before the lock is let go: the next refill counts it.
    std::fs::write(pool.join(format!("{sid}.pid")), child.id().to_string())
}

/// Stops every standby (SIGTERM: each stops its VM), waits up to 10 s for them, and
/// cleans up after any left. Blocking. Returns how many there were.
pub fn drain(config: &Config) -> usize {
    let pool = dir(&config.state_dir);
    if !pool.is_dir() {
        return 0;
    }
    let _lock = PoolLock::take(&pool, true).ok();
    // Claimed ones serve sandboxes: containerd stops those.
    let standbys: Vec<Recorded> = recorded(&pool).into_iter().filter(|r| !r.claimed).collect();
    // Still unclaimed (its `.pid`, not yet `.claimed`), still the same process.
    let unclaimed = |r: &Recorded| pool.join(format!("{}.pid", r.sid)).exists() && is_standby(r.pid, &r.sid);
    for r in &standbys {
        if unclaimed(r) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid as i32), nix::sys::signal::SIGTERM);
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for r in &standbys {
        while is_standby(r.pid, &r.sid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !is_standby(r.pid, &r.sid) {
            clean_up(config, &r.sid);
        } else if unclaimed(r) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid as i32), nix::sys::signal::SIGKILL);
            clean_up(config, &r.sid);
        }
    }
    standbys.len()
}

/// Events before the claim go nowhere: a standby has no containers.
struct NoEvents;

impl EventSink for NoEvents {
    fn publish(&self, _: Event) {}
}

/// The standby's log: its `<sid>.log` (stderr) until it is claimed, then the claiming
/// bundle's `log` FIFO, which containerd copies into its own log.
struct SwitchLogger(Mutex<FifoLogger>);

impl log::Log for SwitchLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).log(r)
    }
    fn flush(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

static LOGGER: std::sync::OnceLock<&'static SwitchLogger> = std::sync::OnceLock::new();

fn level(name: &str, debug: bool) -> log::LevelFilter {
    let l = name.parse().unwrap_or(log::LevelFilter::Info);
    if debug {
        l.max(log::LevelFilter::Debug)
    } else {
        l
    }
}

/// `containerd-shim-vmbox-v2 standby <sid>`: boots and warms the standby VM, waits for a
/// claim, then serves as the claiming sandbox's shim. Returns when the shim is done.
pub async fn run_standby(sid: &str) {
    let stderr = std::os::fd::AsFd::as_fd(&std::io::stderr())
        .try_clone_to_owned()
        .map(std::fs::File::from);
    if let Ok(f) = stderr {
        let logger: &'static SwitchLogger = Box::leak(Box::new(SwitchLogger(Mutex::new(FifoLogger::with_file(f)))));
        if log::set_logger(logger).is_ok() {
            let _ = LOGGER.set(logger);
        }
    }
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => return log::error!("standby {sid}: {e}"),
    };
    log::set_max_level(level(&config.log_level, false));
    let pool = dir(&config.state_dir);
    let pid_file = pool.join(format!("{sid}.pid"));
    let sock_path = pool.join(format!("{sid}.sock"));
    // Its spawner records it; one started by hand records itself.
    if !pid_file.exists() {
        let _ = std::fs::write(&pid_file, std::process::id().to_string());
    }
    let log_file = pool.join(format!("{sid}.log"));
    let (Ok(mut term), Ok(mut int)) = (
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
    ) else {
        return log::error!("standby {sid}: cannot install SIGTERM/SIGINT handlers");
    };
    let abandoned = Arc::new(AtomicBool::new(false));
    let booted = tokio::select! {
        b = boot(&config, sid, abandoned.clone()) => Some(b),
        _ = term.recv() => None,
        _ = int.recv() => None,
    };
    let Some(booted) = booted else {
        // The boot's processes were killed as it was dropped; a host setup it left on a
        // blocking thread is waited for (or kept from running); its directories go here.
        log::info!("standby {sid}: stopped during its boot");
        let c = config.clone();
        let id = sid.to_string();
        let _ = tokio::task::spawn_blocking(move || {
            crate::core::abandon_boot(&abandoned);
            clean_up(&c, &id)
        })
        .await;
        return;
    };
    let standby = match booted {
        Ok(b) => b,
        Err(e) => {
            log::error!("standby {sid}: {e}");
            // Kept for whoever wonders why the pool stays empty; one such log at most.
            let _ = std::fs::rename(&log_file, pool.join("last-failure.log"));
            let _ = std::fs::remove_file(&pid_file);
            return;
        }
    };
    let listener = match tokio::net::UnixListener::bind(&sock_path) {
        Ok(l) => l,
        Err(e) => {
            log::error!("standby {sid}: listen on {}: {e}", sock_path.display());
            standby.sandbox.stop_hard().await;
            return;
        }
    };
    log::info!("standby {sid}: ready");
    let idle = tokio::time::sleep(Duration::from_secs(config.pool.idle_timeout_s));
    tokio::pin!(idle);
    let vm = standby.sandbox.vm.clone();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let conn = loop {
        tokio::select! {
            // A signal first: `pool drain` must never stop a standby that has just become
            // a pod's shim.
            biased;
            _ = term.recv() => break None,
            _ = int.recv() => break None,
            _ = &mut idle => {
                log::info!("standby {sid}: not claimed within {} s", config.pool.idle_timeout_s);
                break None;
            }
            exit = vm.wait() => {
                log::warn!("standby {sid}: the VM ended ({exit:?})");
                break None;
            }
            a = listener.accept() => match a {
                Ok((c, _)) if c.peer_cred().is_ok_and(|p| p.uid() == euid) => break Some(c),
                Ok(_) => log::warn!("standby {sid}: a claim from another user refused"),
                Err(e) => log::warn!("standby {sid}: accept: {e}"),
            },
        }
    };
    // Whatever happens now, no second claim reaches this standby.
    drop(listener);
    let _ = std::fs::remove_file(&sock_path);
    let claimed_file = pool.join(format!("{sid}.claimed"));
    if conn.is_some() {
        if let Err(e) = std::fs::rename(&pid_file, &claimed_file) {
            log::warn!("standby {sid}: record the claim: {e}");
        }
    } else {
        let _ = std::fs::remove_file(&pid_file);
    }
    let Some(conn) = conn else {
        standby.sandbox.stop_hard().await;
        let _ = std::fs::remove_file(&log_file);
        return;
    };
    drop((term, int));
    serve_claim(sid, conn, standby, config.pool.idle_timeout_s).await;
    let _ = std::fs::remove_file(&log_file);
    let _ = std::fs::remove_file(&claimed_file);
}

/// The shape of a standby VM: the default size, no network, no cgroup, no hooks.
fn standby_shape(config: &Config) -> Shape {
    let size = vmbox_oci::sizing::vm_size(
        &oci_spec::runtime::Spec::default(),
        &vmbox_oci::Annotations::default(),
        &config.vm,
        vmbox_oci::sizing::Host::probe(),
    );
    Shape {
        vcpus: size.vcpus,
        memory_mib: size.memory_mib,
        cgroup: None,
        network: vmbox_oci::PodNetwork::Loopback,
        hooks: crate::hooks::HostHooks::default(),
    }
}

/// Why the sandbox of the container in `bundle` (`config.json`) cannot run on a standby
/// VM (`None`: it can, unless containerd's runtime options name another config, which
/// only the Create shows). A spec that does not load is a misfit: the Create reports it.
pub fn misfit(config: &Config, bundle: &Path, id: &str) -> Option<String> {
    let spec = match vmbox_oci::load_spec(bundle) {
        Ok(s) => s,
        Err(e) => return Some(e.to_string()),
    };
    let ann = match vmbox_oci::Annotations::parse(spec.annotations().as_ref()) {
        Ok(a) => a,
        Err(e) => return Some(e.to_string()),
    };
    let shape = match Shape::of(&spec, &ann, config, id, bundle) {
        Ok((s, _)) => s,
        Err(e) => return Some(e.to_string()),
    };
    let own = standby_shape(config);
    crate::core::sandbox::misfit(own.vcpus, own.memory_mib, &shape)
}

/// Boots the standby VM ([`standby_shape`]) and warms it up.
async fn boot(config: &Config, sid: &str, abandoned: Arc<AtomicBool>) -> Result<Standby, crate::error::ShimError> {
    let id = Id::parse("standby id", sid)?;
    let l = layout(&config.state_dir, NAMESPACE, &id)?;
    let shape = standby_shape(config);
    let seams = Seams::system(Arc::new(NoEvents));
    let t0 = std::time::Instant::now();
    let sandbox = Sandbox::boot(seams, config.clone(), NAMESPACE, id, l, shape.clone(), abandoned).await?;
    let booted = t0.elapsed();
    if let Err(e) = sandbox.warm_up(WARM_UP_LIMIT).await {
        // A guest that cannot run a container in time is handed to nobody.
        sandbox.stop_hard().await;
        return Err(e);
    }
    log::info!(
        "standby {sid}: VM up in {} ms, warmed up in {} ms",
        booted.as_millis(),
        (t0.elapsed() - booted).as_millis()
    );
    Ok(Standby {
        sandbox,
        config: config.clone(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
    })
}

/// Reads the claim on `conn`, becomes the claiming sandbox's shim, answers, and serves
/// until the shim's exit is signalled. A standby VM that no boot takes over within
/// `idle_timeout_s` of the claim (containerd never sent a Create) is stopped.
async fn serve_claim(sid: &str, conn: tokio::net::UnixStream, standby: Standby, idle_timeout_s: u64) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (rd, mut wr) = conn.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        CLAIM_TIMEOUT,
        tokio::io::BufReader::new(rd.take(MAX_MESSAGE)).read_line(&mut line),
    )
    .await;
    let claim = match read {
        Ok(Ok(_)) => serde_json::from_str::<Claim>(&line).map_err(|e| format!("claim: {e}")),
        Ok(Err(e)) => Err(format!("read the claim: {e}")),
        Err(_) => Err(format!("no claim within {CLAIM_TIMEOUT:?}")),
    };
    let config = standby.config.clone();
    let served = match claim {
        Ok(c) => match tokio::time::timeout(BECOME_LIMIT, prepare(sid, &c, &config)).await {
            Ok(Ok(core)) => serve(&c.socket, core).await.map(|s| (c, s)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("not ready to serve within {BECOME_LIMIT:?}")),
        },
        Err(e) => Err(e),
    };
    let (claim, (mut server, socket, core, exit)) = match served {
        Ok(s) => s,
        Err(e) => {
            log::warn!("standby {sid}: claim failed: {e}");
            let _ = tokio::time::timeout(CLAIM_TIMEOUT, wr.write_all(&answer(Some(e)))).await;
            standby.sandbox.stop_hard().await;
            return;
        }
    };
    // Offered before the answer: containerd's Create can follow it at once.
    core.offer_standby(standby);
    if !matches!(
        tokio::time::timeout(CLAIM_TIMEOUT, wr.write_all(&answer(None))).await,
        Ok(Ok(()))
    ) {
        // The claimer is gone (its own deadline passed): containerd was told nothing of
        // this socket, so nobody will use it.
        log::warn!("standby {sid}: the claimer did not take the answer; exiting");
        let _ = server.shutdown().await;
        socket.remove();
        core.discard_standby().await;
        return;
    }
    log::info!(
        "standby {sid}: serving sandbox of {} in namespace {}",
        claim.id,
        claim.namespace
    );
    crate::signals::graceful_on_sigterm(core.clone(), exit.clone());
    let unused = Arc::downgrade(&core);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(idle_timeout_s)).await;
        if let Some(core) = unused.upgrade() {
            core.discard_standby().await;
        }
    });
    exit.wait().await;
    // As every shim: gone within EXIT_DEADLINE whatever peers do.
    crate::exit_within_deadline(claim.id.clone());
    core.discard_standby().await;
    let _ = server.shutdown().await;
    socket.remove();
}

/// An answer line.
fn answer(error: Option<String>) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(&Answer { error }).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

fn socket_path(address: &str) -> &str {
    address.strip_prefix("unix://").unwrap_or(address)
}

/// Whether `path` is a shim socket as containerd-shim's `socket_address` names them:
/// `<SOCKET_ROOT>/s/<sha256 in hex>`.
fn is_shim_socket(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    path.parent() == Some(&Path::new(containerd_shim::SOCKET_ROOT).join("s"))
        && (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The socket file this process bound; removed only while it is still that file.
struct SocketFile {
    path: PathBuf,
    /// Inode and change time (s, ns): an inode number alone may be reused at once.
    id: Option<(u64, i64, i64)>,
}

impl SocketFile {
    fn identity(path: &Path) -> Option<(u64, i64, i64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
    }

    fn new(path: &Path) -> SocketFile {
        SocketFile {
            path: path.to_path_buf(),
            id: SocketFile::identity(path),
        }
    }

    fn remove(&self) {
        if self.id.is_some() && SocketFile::identity(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a claimed standby serves with: its ttrpc server, socket, core and exit signal.
type Serving = (Server, SocketFile, Arc<Core>, Arc<ExitSignal>);

/// Takes the claim's identity: the bundle as working directory, its `log` FIFO as the
/// log, containerd's ttrpc socket for events; returns the core to serve. The standby VM
/// is not offered to it yet (the caller does it once the Task API is served).
async fn prepare(sid: &str, c: &Claim, config: &Config) -> Result<Arc<Core>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let ns = Id::parse("namespace", &c.namespace).map_err(|e| e.to_string())?;
    Id::parse("id", &c.id).map_err(|e| e.to_string())?;
    if !is_shim_socket(Path::new(socket_path(&c.socket))) || !c.bundle.join("config.json").is_file() {
        return Err(format!(
            "socket {} or bundle {} is not one containerd makes",
            c.socket,
            c.bundle.display()
        ));
    }
    std::env::set_current_dir(&c.bundle).map_err(|e| format!("chdir {}: {e}", c.bundle.display()))?;
    // containerd holds the FIFO's other end open from before `start`: with none, the
    // open fails (ENXIO) instead of waiting. Writes then block, as the crate's shims' do.
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open("log")
        .and_then(|f| {
            use std::os::fd::AsRawFd;
            let fd = f.as_raw_fd();
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
            let flags = nix::fcntl::OFlag::from_bits_truncate(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
            Ok(f)
        });
    match fifo {
        Ok(f) => {
            if let Some(s) = LOGGER.get() {
                *s.0.lock().unwrap_or_else(|p| p.into_inner()) = FifoLogger::with_file(f);
            }
        }
        Err(e) => log::warn!("standby {sid}: open {}/log: {e}", c.bundle.display()),
    }
    log::set_max_level(level(&config.log_level, c.debug));
    let publisher = RemotePublisher::new(&c.ttrpc_address)
        .await
        .map_err(|e| format!("events to {}: {e}", c.ttrpc_address))?;
    let seams = Seams::system(Arc::new(Forwarder::start(publisher, ns.to_string())));
    Ok(Core::new(Ok(config.clone()), ns.as_str(), seams))
}

/// Serves the Task API of `core` on containerd's `address`. A socket file already there
/// is replaced only if nothing answers on it (as the crate's own shims do); one that
/// answers is another shim's, and the claim fails.
async fn serve(address: &str, core: Arc<Core>) -> Result<Serving, String> {
    let path = Path::new(socket_path(address));
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let listener = match std::os::unix::net::UnixListener::bind(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(format!("{} is served by another shim", path.display()));
            }
            let _ = std::fs::remove_file(path);
            std::os::unix::net::UnixListener::bind(path)
        }
        r => r,
    }
    .map_err(|e| format!("listen on {}: {e}", path.display()))?;
    let socket = SocketFile::new(path);
    let exit = Arc::new(ExitSignal::default());
    let task: Box<dyn containerd_shim::protos::shim_async::Task + Send + Sync> =
        Box::new(TaskService::new(core.clone(), exit.clone()));
    let service = containerd_shim::protos::shim_async::create_task(Arc::from(task));
    let started = match Listener::try_from(listener) {
        Ok(l) => {
            let mut server = Server::new().add_listener(l).register_service(service);
            server.start().await.map(|()| server).map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    match started {
        Ok(server) => Ok((server, socket, core, exit)),
        Err(e) => {
            socket.remove();
            Err(format!("serve {}: {e}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_containerds_shim_sockets_are_served() {
        let root = containerd_shim::SOCKET_ROOT;
        assert!(is_shim_socket(Path::new(&format!("{root}/s/0123abcdef"))));
        for bad in [
            format!("{root}/s/../x"),
            format!("{root}/../etc/s/abc"),
            format!("{root}/s/abc/def"),
            format!("{root}/s/"),
            format!("{root}/s/not-hex"),
            "/tmp/s/abc".to_string(),
        ] {
            assert!(!is_shim_socket(Path::new(&bad)), "{bad}");
        }
    }

    #[test]
    fn start_sends_only_sandboxes_that_fit_a_standby() {
        let dir = std::env::temp_dir().join(format!("vmbox-pool-fit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = Config::default();
        let write = |spec: &oci_spec::runtime::Spec| {
            std::fs::write(dir.join("config.json"), serde_json::to_vec(spec).unwrap()).unwrap()
        };
        let plain = oci_spec::runtime::Spec::default();
        write(&plain);
        let fits = misfit(&config, &dir, "a");
        let mut netns = plain.clone();
        let mut linux = netns.linux().clone().unwrap();
        let namespaces = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|mut n| {
                if n.typ() == oci_spec::runtime::LinuxNamespaceType::Network {
                    n.set_path(Some("/var/run/netns/cni-x".into()));
                }
                n
            })
            .collect();
        linux.set_namespaces(Some(namespaces));
        netns.set_linux(Some(linux));
        write(&netns);
        let pod = misfit(&config, &dir, "a");
        std::fs::remove_file(dir.join("config.json")).unwrap();
        let missing = misfit(&config, &dir, "a");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(fits, None);
        assert!(pod.is_some_and(|w| w.contains("network namespace")));
        assert!(missing.is_some(), "a bundle without a spec is no fit");
    }

    #[test]
    fn a_socket_file_replaced_by_another_is_left_alone() {
        let dir = std::env::temp_dir().join(format!("vmbox-sockfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        std::fs::write(&path, b"ours").unwrap();
        let ours = SocketFile::new(&path);
        // Another shim's file takes its place (made while ours exists: another inode).
        std::fs::write(dir.join("other"), b"theirs").unwrap();
        std::fs::rename(dir.join("other"), &path).unwrap();
        ours.remove();
        let theirs_kept = path.exists();
        let again = SocketFile::new(&path);
        again.remove();
        let ours_removed = !path.exists();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(theirs_kept, "another process's socket file was removed");
        assert!(ours_removed, "our own socket file was left");
    }
}
