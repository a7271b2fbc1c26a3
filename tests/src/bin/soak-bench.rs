//! Soak benchmark (not a test): N create/start/exec/delete cycles of containers in one
//! pod, reporting what leaks (shim fds and memory, processes, mounts) and the cycle
//! latency p50/p99.
//!
//!   make soak            (VMBOX_SOAK_CYCLES=100 by default)

use std::time::{Duration, Instant};

use vmbox_tests::containerd::{containerd, Containerd, IMAGE, RUNTIME};

fn ctr(c: &Containerd, args: &[&str]) -> bool {
    c.quiet(args)
}

struct Snapshot {
    fds: usize,
    rss_kib: u64,
    threads: u64,
    mounts: usize,
    processes: usize,
}

fn snapshot(c: &Containerd, shim: u32) -> Snapshot {
    let status = std::fs::read_to_string(format!("/proc/{shim}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let state = c.state_dir.display().to_string();
    Snapshot {
        fds: std::fs::read_dir(format!("/proc/{shim}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
        mounts: std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&state))
            .count(),
        processes: vmbox_tests::processes_mentioning(&state).len(),
    }
}

fn main() {
    let cycles: usize = std::env::var("VMBOX_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let c = containerd();
    let pod = "--annotation=io.kubernetes.cri.sandbox-id=soak";
    let member = "--annotation=io.kubernetes.cri.container-type=container";
    assert!(
        ctr(
            c,
            &["run", "-d", "--runtime", RUNTIME, pod, IMAGE, "soak", "sleep", "100000"]
        ),
        "pod start"
    );
    let shim: u32 = vmbox_tests::processes_mentioning(&format!("-id soak -address {}", c.address))
        .first()
        .and_then(|p| p.split(':').next())
        .and_then(|p| p.parse().ok())
        .expect("shim pid");
    // One warm-up cycle so lazily created state is not counted as a leak.
    let cycle = |i: usize| -> Duration {
        let id = format!("soak-{i}");
        let t = Instant::now();
        assert!(
            ctr(
                c,
                &[
                    "run",
                    "-d",
                    "--runtime",
                    RUNTIME,
                    pod,
                    member,
                    IMAGE,
                    &id,
                    "sleep",
                    "100000"
                ]
            ),
            "run {id}"
        );
        assert!(
            ctr(c, &["task", "exec", "--exec-id", "x", &id, "/bin/true"]),
            "exec {id}"
        );
        assert!(ctr(c, &["task", "kill", "-s", "KILL", &id]), "kill {id}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ctr(c, &["task", "delete", &id]) {
            assert!(Instant::now() < deadline, "delete {id}");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(ctr(c, &["container", "rm", &id]), "rm {id}");
        t.elapsed()
    };
    cycle(usize::MAX);
    let before = snapshot(c, shim);
    let mut lat: Vec<f64> = (0..cycles).map(|i| cycle(i).as_secs_f64() * 1000.0).collect();
    let after = snapshot(c, shim);
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    println!("## soak: {cycles} create/start/exec/delete cycles in one pod\n");
    println!("| | before | after |\n|---|---:|---:|");
    println!("| shim fds | {} | {} |", before.fds, after.fds);
    println!("| shim RSS KiB | {} | {} |", before.rss_kib, after.rss_kib);
    println!("| shim threads | {} | {} |", before.threads, after.threads);
    println!("| mounts under the state dir | {} | {} |", before.mounts, after.mounts);
    println!(
        "| host processes of the sandbox | {} | {} |",
        before.processes, after.processes
    );
    println!(
        "\ncycle latency: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        p(0.5),
        p(0.99),
        lat[lat.len() - 1]
    );
    let _ = ctr(c, &["task", "kill", "-s", "KILL", "soak"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctr(c, &["task", "delete", "soak"]) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = ctr(c, &["container", "rm", "soak"]);
}
