//! cgroup v2 in the guest: every container gets `/sys/fs/cgroup/vmbox/<id>`. Stats,
//! process lists, limits and kill-all read and write the unified hierarchy directly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use vmbox_protocol::agent::{CpuStats, IoEntry, MemoryStats, PidsStats, StatsContainerResponse};

use crate::AgentError;

const ROOT: &str = "/sys/fs/cgroup";

/// The cgroupsPath vmbox gives container `id`.
pub fn path(id: &str) -> PathBuf {
    PathBuf::from(format!("/vmbox/{id}"))
}

fn dir(id: &str) -> PathBuf {
    Path::new(ROOT).join("vmbox").join(id)
}

/// Makes the controllers available to the containers' cgroups.
pub fn enable_controllers() -> Result<(), AgentError> {
    let wanted = "+cpu +cpuset +io +memory +pids";
    let vmbox = Path::new(ROOT).join("vmbox");
    std::fs::create_dir_all(&vmbox).map_err(|e| AgentError::io(&vmbox, e))?;
    for d in [Path::new(ROOT), vmbox.as_path()] {
        let f = d.join("cgroup.subtree_control");
        // Write one at a time so a missing controller does not block the others.
        for c in wanted.split(' ') {
            if let Err(e) = std::fs::write(&f, c) {
                log::warn!("cannot enable {c} in {}: {e}", f.display());
            }
        }
    }
    Ok(())
}

/// Pids of every process in the container's cgroup; none once the cgroup is gone (its
/// processes have all exited and libcontainer removed it).
pub fn pids(id: &str) -> Result<Vec<u32>, AgentError> {
    let f = dir(id).join("cgroup.procs");
    let text = match std::fs::read_to_string(&f) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(AgentError::io(&f, e)),
    };
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Removes the container's cgroup (empty once its processes are reaped); gone already
/// is fine.
pub fn remove(id: &str) -> Result<(), AgentError> {
    let d = dir(id);
    match std::fs::remove_dir(&d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(&d, e)),
    }
}

fn read(id: &str, file: &str) -> Option<String> {
    std::fs::read_to_string(dir(id).join(file)).ok()
}

/// "key value" lines, as in cpu.stat, memory.stat and memory.events.
fn flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// A single number, with "max" as 0 (unlimited).
fn single(text: Option<String>) -> u64 {
    text.and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

pub fn stats(id: &str) -> Result<StatsContainerResponse, AgentError> {
    if !dir(id).exists() {
        return Err(AgentError::NotFound(format!("cgroup of container {id}")));
    }
    let cpu = read(id, "cpu.stat").map(|t| flat_keyed(&t)).unwrap_or_default();
    let g = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let events = read(id, "memory.events").map(|t| flat_keyed(&t)).unwrap_or_default();
    let io = read(id, "io.stat").map(|t| parse_io(&t)).unwrap_or_default();
    Ok(StatsContainerResponse {
        cpu: Some(CpuStats {
            usage_usec: g(&cpu, "usage_usec"),
            user_usec: g(&cpu, "user_usec"),
            system_usec: g(&cpu, "system_usec"),
            nr_periods: g(&cpu, "nr_periods"),
            nr_throttled: g(&cpu, "nr_throttled"),
            throttled_usec: g(&cpu, "throttled_usec"),
            ..Default::default()
        })
        .into(),
        memory: Some(MemoryStats {
            usage: single(read(id, "memory.current")),
            limit: single(read(id, "memory.max")),
            swap_usage: single(read(id, "memory.swap.current")),
            stat: read(id, "memory.stat").map(|t| flat_keyed(&t)).unwrap_or_default(),
            oom: g(&events, "oom"),
            oom_kill: g(&events, "oom_kill"),
            ..Default::default()
        })
        .into(),
        pids: Some(PidsStats {
            current: single(read(id, "pids.current")),
            limit: single(read(id, "pids.max")),
            ..Default::default()
        })
        .into(),
        io,
        ..Default::default()
    })
}

/// io.stat lines: "MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...".
fn parse_io(text: &str) -> Vec<IoEntry> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let (maj, min) = parts.next()?.split_once(':')?;
            let mut e = IoEntry {
                major: maj.parse().ok()?,
                minor: min.parse().ok()?,
                ..Default::default()
            };
            for kv in parts {
                let Some((k, v)) = kv.split_once('=') else { continue };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => e.rbytes = v,
                    "wbytes" => e.wbytes = v,
                    "rios" => e.rios = v,
                    "wios" => e.wios = v,
                    _ => {}
                }
            }
            Some(e)
        })
        .collect()
}

/// The number of OOM kills the container has seen.
pub fn oom_kills(id: &str) -> u64 {
    read(id, "memory.events")
        .map(|t| flat_keyed(&t))
        .and_then(|m| m.get("oom_kill").copied())
        .unwrap_or(0)
}

/// Applies the OCI resources that cgroup v2 can change on a running container.
pub fn update(id: &str, r: &oci_spec::runtime::LinuxResources) -> Result<(), AgentError> {
    let d = dir(id);
    if !d.exists() {
        return Err(AgentError::NotFound(format!("cgroup of container {id}")));
    }
    let write = |file: &str, value: String| {
        let f = d.join(file);
        std::fs::write(&f, &value).map_err(|e| {
            let msg = format!("{}: {value}: {e}", f.display());
            // The kernel refuses a malformed value with EINVAL: the request's fault.
            if e.kind() == std::io::ErrorKind::InvalidInput {
                AgentError::Invalid(msg)
            } else {
                AgentError::Internal(msg)
            }
        })
    };
    if let Some(m) = r.memory() {
        if let Some(limit) = m.limit() {
            write("memory.max", if limit < 0 { "max".into() } else { limit.to_string() })?;
        }
    }
    if let Some(c) = r.cpu() {
        if c.quota().is_some() || c.period().is_some() {
            let quota = match c.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            write("cpu.max", format!("{quota} {}", c.period().unwrap_or(100_000)))?;
        }
        if let Some(shares) = c.shares() {
            // The conversion runc and crun use from cgroup v1 shares to v2 weight.
            let weight = if shares == 0 {
                100
            } else {
                1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
            };
            write("cpu.weight", weight.to_string())?;
        }
    }
    if let Some(p) = r.pids() {
        write(
            "pids.max",
            if p.limit() <= 0 {
                "max".into()
            } else {
                p.limit().to_string()
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_io_stat() {
        let e = parse_io("254:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n");
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].major, e[0].minor, e[0].rbytes, e[0].wbytes, e[0].rios, e[0].wios),
            (254, 0, 10, 20, 1, 2)
        );
    }

    #[test]
    fn parses_flat_keyed() {
        let m = flat_keyed("usage_usec 5\nuser_usec 3\nbogus\n");
        assert_eq!(m["usage_usec"], 5);
        assert_eq!(m.len(), 2);
    }
}
