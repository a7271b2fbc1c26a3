//! vmbox vs runc vs runsc (gVisor), side by side through one private containerd:
//! `ctr run --rm` of /bin/true (vmbox also with a warm pool of one, through a containerd
//! of its own), `ctr task exec` latency, PSS per idle sandbox, 10 sandboxes in parallel,
//! and where vmbox's start time goes. Not a test: prints a table.
//!
//!   make bench            (VMBOX_BENCH_RUNS=20, VMBOX_BENCH_IDLE=5, VMBOX_BENCH_DENSITY=50
//!                          by default)
//!
//! It ends with issue 14's targets: vmbox/runc ratios measured side by side in this run,
//! and the guest's phases, next to their bounds. Nothing here assumes an accelerator:
//! under KVM the TCG cache row is 0 and the same targets apply.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmbox_tests::containerd::{containerd, Containerd, IMAGE, RUNTIME};

struct Rt {
    name: &'static str,
    args: Vec<String>,
}

fn runtimes(c: &Containerd) -> Vec<Rt> {
    let mut rts = vec![
        Rt {
            name: "vmbox",
            args: vec!["--runtime".into(), RUNTIME.into()],
        },
        Rt {
            name: "runc",
            args: vec!["--runtime".into(), "io.containerd.runc.v2".into()],
        },
    ];
    if Command::new("runsc")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        let wrapper = c.dir.join("runsc-ptrace");
        std::fs::write(
            &wrapper,
            "#!/bin/sh\nexec runsc --network=none --platform=ptrace \"$@\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        rts.push(Rt {
            name: "runsc",
            args: vec![
                "--runtime".into(),
                "io.containerd.runc.v2".into(),
                "--runc-binary".into(),
                wrapper.display().to_string(),
            ],
        });
    } else {
        eprintln!("runsc not installed (apt-get install runsc): its column is left out");
    }
    rts
}

fn ctr(c: &Containerd, args: &[&str]) -> (bool, Duration) {
    let t = Instant::now();
    let ok = Command::new("timeout")
        .args(["300", "ctr", "--address", &c.address])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    (ok, t.elapsed())
}

fn with_rt<'a>(rt: &'a Rt, before: &[&'a str], after: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = before.to_vec();
    v.extend(rt.args.iter().map(String::as_str));
    v.extend_from_slice(after);
    v
}

fn summary(v: &mut [f64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    format!("{:.0} / {:.0} / {:.0}", v[0], v[v.len() / 2], v[v.len() - 1])
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn pids_under(root: u32) -> Vec<u32> {
    let mut parent = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// PSS of one process in KiB, by kind of mapping.
#[derive(Default, Clone, Copy)]
struct Pss {
    total: u64,
    /// Guest RAM: QEMU's memfd backend, also mapped by the vhost-user daemons.
    guest_ram: u64,
    /// TCG's translated-code cache: QEMU's anonymous executable mapping (emulation only).
    tcg_cache: u64,
}

impl std::ops::AddAssign for Pss {
    fn add_assign(&mut self, o: Pss) {
        self.total += o.total;
        self.guest_ram += o.guest_ram;
        self.tcg_cache += o.tcg_cache;
    }
}

fn pss(pid: u32) -> Pss {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let is_qemu = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().contains("qemu-system"))
        .unwrap_or(false);
    let mut p = Pss::default();
    let mut kind = 0; // 0 other, 1 guest RAM, 2 TCG cache
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 5 && f[0].contains('-') && !l.ends_with(" kB") {
            kind = if l.contains("memfd:") {
                1
            } else if is_qemu && f.len() == 5 && f[1].contains('x') {
                2
            } else {
                0
            };
        } else if let Some(v) = l.strip_prefix("Pss:") {
            let kb: u64 = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
            p.total += kb;
            match kind {
                1 => p.guest_ram += kb,
                2 => p.tcg_cache += kb,
                _ => {}
            }
        }
    }
    p
}

fn cleanup(c: &Containerd, id: &str) {
    // A `--rm` run that succeeded left nothing: no need to poll its task away.
    if !ctr(c, &["container", "info", id]).0 {
        return;
    }
    let _ = ctr(c, &["task", "kill", "-s", "KILL", id]);
    for _ in 0..100 {
        if ctr(c, &["task", "delete", id]).0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ctr(c, &["container", "rm", id]);
}

fn main() {
    let runs: usize = std::env::var("VMBOX_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let idle: usize = std::env::var("VMBOX_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let c = containerd();
    let rts = runtimes(c);
    let log_start = std::fs::metadata(c.dir.join("containerd.log"))
        .map(|m| m.len())
        .unwrap_or(0);
    let accel = {
        let (a, why) = vmbox_hypervisor::accel::choose(
            vmbox_config::Accelerator::Auto,
            &vmbox_hypervisor::accel::HostFacts::probe(),
        );
        format!("{} ({why})", a.name())
    };

    // 1. ctr run --rm IMG ID /bin/true, interleaved.
    let mut run_ms: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut run_fail: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..runs {
        for rt in &rts {
            let id = format!("b-{}-{i}", rt.name);
            let (ok, d) = ctr(c, &with_rt(rt, &["run", "--rm"], &[IMAGE, &id, "/bin/true"]));
            if ok {
                run_ms.entry(rt.name).or_default().push(d.as_secs_f64() * 1000.0);
            } else {
                *run_fail.entry(rt.name).or_default() += 1;
                cleanup(c, &id);
            }
        }
    }

    // 1b. The same with the warm pool, each run started once a standby VM is ready.
    let pooled = pooled_runs(c, runs);

    // 2. exec latency, 3. PSS per idle sandbox.
    let mut exec_ms: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut mem: BTreeMap<&str, Vec<Pss>> = BTreeMap::new();
    for rt in &rts {
        let ids: Vec<String> = (0..idle).map(|i| format!("idle-{}-{i}", rt.name)).collect();
        for id in &ids {
            ctr(c, &with_rt(rt, &["run", "-d"], &[IMAGE, id, "sleep", "100000"]));
        }
        for n in 0..runs {
            let (ok, d) = ctr(
                c,
                &["task", "exec", "--exec-id", &format!("x{n}"), &ids[0], "/bin/true"],
            );
            if ok {
                exec_ms.entry(rt.name).or_default().push(d.as_secs_f64() * 1000.0);
            }
        }
        std::thread::sleep(Duration::from_secs(2)); // let the sandboxes settle to idle
        for id in &ids {
            let Some(shim) = c.pid_of(&format!("-id {id} -address {}", c.address)).map(|p| p as u32) else {
                continue;
            };
            let mut sum = Pss::default();
            for p in pids_under(shim) {
                sum += pss(p);
            }
            mem.entry(rt.name).or_default().push(sum);
        }
        for id in &ids {
            cleanup(c, id);
        }
    }

    // 4. 10 sandboxes in parallel.
    let mut parallel: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for rt in &rts {
        let t = Instant::now();
        let children: Vec<_> = (0..10)
            .map(|i| {
                let id = format!("par-{}-{i}", rt.name);
                Command::new("timeout")
                    .args(["300", "ctr", "--address", &c.address])
                    .args(with_rt(rt, &["run", "--rm"], &[IMAGE, &id, "/bin/true"]))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn ctr")
            })
            .collect();
        let failures = children
            .into_iter()
            .map(|mut ch| ch.wait().map(|s| !s.success()).unwrap_or(true))
            .filter(|f| *f)
            .count();
        parallel.insert(rt.name, (t.elapsed().as_secs_f64(), failures));
        for i in 0..10 {
            cleanup(c, &format!("par-{}-{i}", rt.name));
        }
    }

    // 5. Density: many idle vmbox sandboxes at once.
    let density = density(c, &rts[0]);

    // 6. Where vmbox's start time goes, from the shim's debug timings.
    let log = std::fs::read(c.dir.join("containerd.log")).unwrap_or_default();
    let log = String::from_utf8_lossy(&log[log_start as usize..]);
    let mut phases: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for l in log.lines() {
        let Some(rest) = l.split("timing: ").nth(1) else {
            continue;
        };
        // The `ctr run --rm` runs, and the execs into the first idle vmbox sandbox.
        let prefix = if rest.contains("idle-vmbox-0 exec=x") {
            "exec_"
        } else if rest.contains("b-vmbox-") && !rest.contains("exec=x") {
            ""
        } else {
            continue;
        };
        for kv in rest.trim_end_matches('"').split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else { continue };
            if let (Some(k), Ok(v)) = (k.strip_suffix("_ms"), v.trim_end_matches('"').parse::<f64>()) {
                phases.entry(format!("{prefix}{k}")).or_default().push(v);
            }
        }
    }

    println!("## vmbox vs runc vs runsc, accelerator: {accel}\n");
    println!("{runs} runs each, interleaved; times in ms as min / median / max.\n");
    println!("| | {} |", rts.iter().map(|r| r.name).collect::<Vec<_>>().join(" | "));
    println!("|---|{}|", rts.iter().map(|_| "---:").collect::<Vec<_>>().join("|"));
    let row = |name: &str, f: &dyn Fn(&str) -> String| {
        println!(
            "| {name} | {} |",
            rts.iter().map(|r| f(r.name)).collect::<Vec<_>>().join(" | ")
        );
    };
    row("`ctr run --rm` /bin/true (ms)", &|n| {
        summary(&mut run_ms.get(n).cloned().unwrap_or_default())
    });
    row("  failures", &|n| run_fail.get(n).copied().unwrap_or(0).to_string());
    row(
        "`ctr run --rm` /bin/true with a warm pool, a standby VM ready (ms)",
        &|n| match n {
            "vmbox" => summary(&mut pooled.ms.clone()),
            _ => "-".into(),
        },
    );
    row("  failures; runs that found no standby ready", &|n| match n {
        "vmbox" => format!("{}; {}", pooled.failures, pooled.cold),
        _ => "-".into(),
    });
    row("`ctr task exec` /bin/true (ms)", &|n| {
        summary(&mut exec_ms.get(n).cloned().unwrap_or_default())
    });
    let mem_row = |label: &str, f: fn(&Pss) -> u64| {
        row(label, &|n| {
            mem.get(n)
                .map(|m| {
                    let mut v: Vec<f64> = m.iter().map(|p| f(p) as f64 / 1024.0).collect();
                    format!("{:.1}", median(&mut v))
                })
                .unwrap_or("-".into())
        })
    };
    mem_row(
        &format!("PSS per idle sandbox, MiB (median of {idle} running at once)"),
        |p| p.total,
    );
    mem_row("  host processes without guest RAM", |p| p.total - p.guest_ram);
    mem_row("  of which TCG's translated-code cache (emulation only)", |p| {
        p.tcg_cache
    });
    mem_row("  host processes without guest RAM and TCG cache", |p| {
        p.total - p.guest_ram - p.tcg_cache
    });
    row("10 sandboxes in parallel: total s (failures)", &|n| {
        parallel
            .get(n)
            .map(|(s, f)| format!("{s:.1} ({f})"))
            .unwrap_or("-".into())
    });
    println!("\n### Where a vmbox `ctr run --rm` goes (median ms over {runs} runs, from the shim's debug timings)\n");
    println!("Host = the phase's time minus its waits for the guest (agent requests, stream connects, the");
    println!("guest's boot from QEMU's vCPUs being released to the agent's hello). Boot = daemons_up +");
    println!("qemu_init (host) + guest_boot (guest; guest_clock is the part the guest kernel's clock saw).\n");
    println!("| phase | total | guest | host |\n|---|---:|---:|---:|");
    let mut med = |k: &str| phases.get_mut(k).map(|v| median(v));
    let mut host_total = 0.0;
    for k in [
        "shim_start",
        "daemons_up",
        "qemu_init",
        "guest_boot",
        "guest_clock",
        "boot",
        "create",
        "start",
        "teardown",
        "exec_start",
    ] {
        let Some(total) = med(k) else { continue };
        let guest = med(&format!("{k}_guest"));
        let host = med(&format!("{k}_host"));
        let cell = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "".into());
        println!("| {k} | {total:.0} | {} | {} |", cell(guest), cell(host));
        if matches!(k, "boot" | "create" | "start" | "teardown") {
            host_total += host.unwrap_or(total);
        } else if k == "shim_start" {
            host_total += total;
        }
    }
    println!("| **host-side per container start** (shim_start + host parts of boot, create, start, teardown) | | | **{host_total:.0}** |");
    if let Some(d) = &density {
        println!("\n### {} idle vmbox sandboxes at once\n", d.sandboxes);
        println!("Started by {} `ctr run -d ... sleep` at a time.\n", d.jobs);
        println!("| | |\n|---|---:|");
        println!("| time to start all of them, s | {:.1} |", d.start_s);
        println!("| failures | {} |", d.failures);
        println!("| total PSS, MiB | {:.0} |", d.pss.total as f64 / 1024.0);
        println!("|   of which guest RAM | {:.0} |", d.pss.guest_ram as f64 / 1024.0);
        println!(
            "|   of which TCG's translated-code cache | {:.0} |",
            d.pss.tcg_cache as f64 / 1024.0
        );
        println!(
            "| PSS per sandbox, MiB | {:.1} |",
            d.pss.total as f64 / 1024.0 / d.running.max(1) as f64
        );
    }

    // Issue 14's targets, from this run.
    let ratio = |m: &BTreeMap<&str, Vec<f64>>| {
        let mut v = m.get("vmbox").cloned().unwrap_or_default();
        let mut r = m.get("runc").cloned().unwrap_or_default();
        median(&mut v) / median(&mut r)
    };
    let idle_mib = |f: fn(&Pss) -> u64| {
        let mut v: Vec<f64> = mem
            .get("vmbox")
            .map(|m| m.iter().map(|p| f(p) as f64 / 1024.0).collect())
            .unwrap_or_default();
        median(&mut v)
    };
    let pooled_ratio = {
        let mut r = run_ms.get("runc").cloned().unwrap_or_default();
        median(&mut pooled.ms.clone()) / median(&mut r)
    };
    let mut targets: Vec<(&str, f64, f64)> = vec![
        ("`ctr run --rm` /bin/true, vmbox/runc median ratio", ratio(&run_ms), 6.0),
        (
            "  the same with a warm pool (pool.size = 1, a standby ready)",
            pooled_ratio,
            6.0,
        ),
        (
            "  create in the guest on a standby VM (create_guest), ms",
            pooled.create_guest,
            60.0,
        ),
        (
            "`ctr task exec` /bin/true, vmbox/runc median ratio",
            ratio(&exec_ms),
            1.5,
        ),
        (
            "create in the guest (create_guest), ms",
            med("create_guest").unwrap_or(f64::NAN),
            60.0,
        ),
        (
            "teardown before `Delete` answers, ms",
            med("teardown").unwrap_or(f64::NAN),
            60.0,
        ),
        (
            "guest boot, vCPUs released to the agent's hello, ms",
            med("guest_boot").unwrap_or(f64::NAN),
            450.0,
        ),
        (
            "idle sandbox PSS, everything included, MiB",
            idle_mib(|p| p.total),
            64.0,
        ),
        (
            "  the same without TCG's cache (what KVM would see), MiB",
            idle_mib(|p| p.total - p.tcg_cache),
            64.0,
        ),
        (
            "guest memory touched by an idle sandbox, MiB",
            idle_mib(|p| p.guest_ram),
            20.0,
        ),
    ];
    if let Some(d) = &density {
        targets.push(("idle sandboxes started at once: failures", d.failures as f64, 0.0));
    }
    println!("\n### Targets (issue 14), accelerator: {accel}\n");
    println!("| | measured | target | met |\n|---|---:|---:|---|");
    for (name, v, bound) in targets {
        let met = if v.is_nan() {
            "-"
        } else if v <= bound {
            "yes"
        } else {
            "no"
        };
        println!("| {name} | {v:.2} | <= {bound} | {met} |");
    }
}

/// What [`pooled_runs`] measured.
struct Pooled {
    ms: Vec<f64>,
    failures: usize,
    /// Runs that started without a ready standby (after waiting 120 s for one).
    cold: usize,
    /// Median create_guest of those runs, from the shim's timings.
    create_guest: f64,
}

/// `runs` × `ctr run --rm /bin/true` through a containerd of its own whose vmbox config
/// keeps a warm pool of one (`pool.size = 1`, docs/lifecycle.md); each run starts once a
/// standby VM is ready, as a node with a pool sized for its arrival rate would find it.
fn pooled_runs(shared: &Containerd, runs: usize) -> Pooled {
    let c = Containerd::start_at(std::path::Path::new("/run/vmbox-bench-pool"), false);
    let mut config = std::fs::read_to_string(&c.config_path).unwrap_or_default();
    config.push_str("[pool]\nsize = 1\n");
    std::fs::write(&c.config_path, config).expect("write the pool config");
    let tar = shared.dir.join("busybox.tar").display().to_string();
    ctr(&c, &["image", "import", &tar]);
    let pool = c.state_dir.join("pool");
    let ready = || {
        std::fs::read_dir(&pool)
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(".sock")))
            .unwrap_or(false)
    };
    // The first start fills the pool.
    ctr(
        &c,
        &["run", "--rm", "--runtime", RUNTIME, IMAGE, "pool-fill", "/bin/true"],
    );
    let mut out = Pooled {
        ms: Vec::new(),
        failures: 0,
        cold: 0,
        create_guest: f64::NAN,
    };
    for i in 0..runs {
        let t = Instant::now();
        while !ready() && t.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !ready() {
            out.cold += 1;
        }
        let id = format!("pool-{i}");
        let (ok, d) = ctr(&c, &["run", "--rm", "--runtime", RUNTIME, IMAGE, &id, "/bin/true"]);
        if ok {
            out.ms.push(d.as_secs_f64() * 1000.0);
        } else {
            out.failures += 1;
            cleanup(&c, &id);
        }
    }
    let log = std::fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default();
    let mut creates: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("timing: container=pool-") && !l.contains("pool-fill"))
        .filter_map(|l| {
            l.split("create_guest_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    out.create_guest = median(&mut creates);
    c.stop();
    out
}

/// What [`density`] measured.
struct Density {
    sandboxes: usize,
    jobs: usize,
    running: usize,
    start_s: f64,
    failures: usize,
    pss: Pss,
}

/// Starts `VMBOX_BENCH_DENSITY` (50; 0 skips) idle sandboxes of `rt`,
/// `VMBOX_BENCH_DENSITY_JOBS` (4) at a time, measures their total PSS, removes them.
fn density(c: &Containerd, rt: &Rt) -> Option<Density> {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let n = env("VMBOX_BENCH_DENSITY", 50);
    let jobs = env("VMBOX_BENCH_DENSITY_JOBS", 4).max(1);
    if n == 0 {
        return None;
    }
    let ids: Vec<String> = (0..n).map(|i| format!("den-{}-{i}", rt.name)).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::atomic::AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(id) = ids.get(i) else { break };
                if !ctr(c, &with_rt(rt, &["run", "-d"], &[IMAGE, id, "sleep", "100000"])).0 {
                    failures.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let start_s = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2)); // let the sandboxes settle to idle
    let mut pss_sum = Pss::default();
    let mut running = 0;
    for id in &ids {
        let Some(shim) = c.pid_of(&format!("-id {id} -address {}", c.address)).map(|p| p as u32) else {
            continue;
        };
        running += 1;
        for p in pids_under(shim) {
            pss_sum += pss(p);
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(id) = ids.get(i) else { break };
                cleanup(c, id);
            });
        }
    });
    Some(Density {
        sandboxes: n,
        jobs,
        running,
        start_s,
        failures: failures.into_inner(),
        pss: pss_sum,
    })
}
