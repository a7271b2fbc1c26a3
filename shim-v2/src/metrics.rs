//! The agent's cgroup v2 figures as containerd's `io.containerd.cgroups.v2.Metrics`.

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use vmbox_protocol::agent::StatsContainerResponse;

pub const TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn to_cgroup_v2(s: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = Some(CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        })
        .into();
    }
    if let Some(mem) = s.memory.as_ref() {
        let g = |k: &str| mem.stat.get(k).copied().unwrap_or(0);
        m.memory = Some(MemoryStat {
            anon: g("anon"),
            file: g("file"),
            kernel_stack: g("kernel_stack"),
            slab: g("slab"),
            sock: g("sock"),
            shmem: g("shmem"),
            file_mapped: g("file_mapped"),
            file_dirty: g("file_dirty"),
            file_writeback: g("file_writeback"),
            inactive_anon: g("inactive_anon"),
            active_anon: g("active_anon"),
            inactive_file: g("inactive_file"),
            active_file: g("active_file"),
            unevictable: g("unevictable"),
            pgfault: g("pgfault"),
            pgmajfault: g("pgmajfault"),
            usage: mem.usage,
            usage_limit: if mem.limit == 0 { u64::MAX } else { mem.limit },
            swap_usage: mem.swap_usage,
            ..Default::default()
        })
        .into();
        m.memory_events = Some(MemoryEvents {
            oom: mem.oom,
            oom_kill: mem.oom_kill,
            ..Default::default()
        })
        .into();
    }
    if let Some(p) = s.pids.as_ref() {
        m.pids = Some(PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        })
        .into();
    }
    let usage =
        s.io.iter()
            .map(|e| IOEntry {
                major: e.major,
                minor: e.minor,
                rbytes: e.rbytes,
                wbytes: e.wbytes,
                rios: e.rios,
                wios: e.wios,
                ..Default::default()
            })
            .collect();
    m.io = Some(IOStat {
        usage,
        ..Default::default()
    })
    .into();
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbox_protocol::agent::{CpuStats, MemoryStats};

    #[test]
    fn figures_land_in_containerds_fields() {
        let s = StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_usec: 7,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                usage: 4096,
                limit: 0,
                oom_kill: 1,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let m = to_cgroup_v2(&s);
        assert_eq!(m.cpu.usage_usec, 7);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, u64::MAX, "0 means unlimited");
        assert_eq!(m.memory_events.oom_kill, 1);
    }
}
